"""``saekit train``: train one or more dictionaries on activations from a file or a cache."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
from typing import Any

import torch

from .._malloc import keep_large_allocations_in_heap
from ..configuration import ConfigError, add_arguments, collect_overrides, load_config, to_dict
from ..dictionaries import SAEConfig
from ..sources import ArraySource, open_array
from ..training import RunConfig, Trainer
from ..training.distributed import ProcessGroup, from_environment

log = logging.getLogger("saekit.train")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train sparse autoencoders on cached activations",
        description="Train TopK / BatchTopK / JumpReLU / ReLU dictionaries. Settings come from "
        "--config FILE (YAML with sections sae, train, data) and flags, which override it.",
    )
    parser.add_argument("--config", help="YAML file of settings (see configs/)")
    add_arguments(parser, RunConfig)
    parser.set_defaults(handler=run)


def expand_sweep(base: SAEConfig, sweep: dict[str, list]) -> list[SAEConfig]:
    """One SAEConfig per combination of the swept values."""
    if not sweep:
        return [base]
    keys = list(sweep)
    configs = []
    for values in itertools.product(*(sweep[k] for k in keys)):
        try:
            configs.append(dataclasses.replace(base, **dict(zip(keys, values, strict=True))))
        except (TypeError, ConfigError) as err:
            raise ConfigError(
                f"sweep combination {dict(zip(keys, values, strict=True))} is invalid: {err}"
            ) from err
    return configs


def open_source(cfg: RunConfig, group: ProcessGroup | None = None):
    """The activation source that a run config names; in data-parallel runs, this rank's share."""
    data, train = cfg.data, cfg.train
    shard: dict[str, int] = {}
    if group is not None and group.active and train.parallel == "data":
        shard = {"rank": group.rank, "world_size": group.world_size}
    if data.activations:
        array = open_array(data.activations, data.tensor_key)
        return ArraySource(
            array,
            train.batch_size,
            epochs=train.epochs,
            shuffle=data.shuffle,
            seed=train.data_seed,
            name=data.activations,
            **shard,
        )
    if data.cache:
        from ..cache import open_training_source

        return open_training_source(
            data.cache,
            hookpoint=cfg.sae.hookpoint,
            batch_size=train.batch_size,
            epochs=train.epochs,
            shuffle=data.shuffle,
            seed=train.data_seed,
            **shard,
        )
    raise ConfigError("no activations to train on: pass --activations FILE or --cache DIR")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(RunConfig, args.config, collect_overrides(args, RunConfig))
    keep_large_allocations_in_heap()
    device_type = "cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu"
    group = from_environment(device_type, cfg.train.dist_timeout_s)
    try:
        source = open_source(cfg, group)
        sae = cfg.sae
        provenance = getattr(source, "provenance", None)
        if provenance:  # the cache records the model, revision, hookpoint and capture target
            sae = dataclasses.replace(sae, **provenance)
        configs = expand_sweep(sae, cfg.sweep)
        trainer = Trainer(
            configs,
            cfg.train,
            source,
            cfg.output_dir,
            resume=cfg.resume,
            run_config=to_dict(cfg),
            wandb_project=cfg.wandb_project,
            run_name=cfg.run_name,
            group=group,
        )
        results = trainer.fit()
    finally:  # also after an error or a lost peer: leave the group before the process ends
        if group.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    for result in results:
        if result.path is None:
            continue
        m = result.metrics
        print(
            f"{result.name}: explained variance {m.get('explained_variance', float('nan')):.4f}, "
            f"L0 {m.get('l0', float('nan')):.1f}, dead {100 * m.get('dead_fraction', 0):.1f}% -> {result.path}"
        )
    return 0
