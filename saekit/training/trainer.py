"""The trainer: any iterator of ``(batch, d_in)`` activations in, one or more dictionaries out.

Reading activations is the expensive part of a run, so every batch trains all the configured
dictionaries (different k, widths, seeds or architectures) before the next one is read.

The loop, per batch and per dictionary (Gao et al. 2024 for TopK; the same skeleton for all):

1. forward: normalised MSE (FVU) + AuxK on dead latents, or + the sparsity penalty;
2. backward through the sparse kernels (only active latents carry gradient);
3. for unit-norm decoders, drop the gradient component parallel to each decoder row;
4. clip, Adam step with warm-up/decay, renormalise decoder rows;
5. update each latent's tokens-since-last-fired counter (dead-latent tracking).

A step never waits for the device (Gao et al. train on GPUs, where every value read back to the
host drains the queue of launched kernels and idles the GPU until it refills): everything a
step decides on stays a device tensor, and the host reads the device only on logging steps
(every ``log_every``), before a checkpoint, and at the end.

* Non-finite data or losses: a batch's finiteness is a 0-d device flag, a dictionary's loss
  (and gradient norm) adds its own, and fused Adam skips the update when handed the flag as
  ``found_inf`` (as under ``torch.amp.GradScaler``); the dead-latent counters, the metric
  windows and the dictionaries' buffers (BatchTopK's threshold) ignore a skipped step. A device
  record keeps the count and the first such event; the host reads it on the next logging or
  checkpoint step and applies ``nan_policy`` and ``max_skipped_batches`` there, so a checkpoint
  never follows an unread bad batch. A skipped batch still counts as a step (it updates
  nothing). The first batch, which initialisation reads anyway, is checked on the host.
* Dead latents for AuxK: their ids are a tensor whose size the selection needs on the host, so
  the set is refreshed on logging steps only, and kept (and checkpointed) in between. A latent
  is dead after ``dead_tokens`` (1M by default) tokens without firing; ``log_every`` steps
  (50 x 4096 = 200k tokens by default) is a small part of that, so AuxK's view lags the
  counters by at most one logging interval.
* Row and token counts are Python integers from shapes, or device tensors in data-parallel runs.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._io import atomic_write_json, check_writable_dir, read_json
from ..configuration import ConfigError, to_dict
from ..dictionaries import (
    SAEConfig,
    SparseAutoencoder,
    StepContext,
    build_dictionary,
    save_dictionary,
    write_index,
)
from ..dictionaries.base import Reducer, default_k_aux
from ..dictionaries.io import CONFIG_FILE, INDEX_FILE
from ..sources import DataError, ResumableSource
from . import checkpoint as ckpt
from .checkpoint import flatten_optimizer_state, list_checkpoints, unflatten_optimizer_state
from .config import RESUMABLE_CHANGES, TrainConfig
from .distributed import PeerLostError, ProcessGroup, flat_all_reduce_
from .init import geometric_median, init_from_data, input_scale
from .latent_parallel import LATENT_DIM_PARAMETERS, LatentShard
from .logging import MetricsLogger

log = logging.getLogger("saekit.train")

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"

# log10(firing frequency) bin edges of the feature-density histogram (Bricken et al. 2023).
DENSITY_EDGES = [-8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0]


class NonFiniteError(RuntimeError):
    """Training met NaN/inf activations or losses and was told to stop."""


@dataclass
class TrainResult:
    """One trained dictionary."""

    name: str
    """Folder name under the output directory."""
    path: Path | None
    """Where it was saved (None when the trainer had no output directory)."""
    sae: SparseAutoencoder
    """The dictionary ready for inference: normalisation folded in, BatchTopK as JumpReLU."""
    metrics: dict[str, Any]
    """The last metric record of the run."""


@dataclass
class _Window:
    """Metric accumulators between two log records: device tensors, so that a step adds to them
    without reading anything back. A skipped step (non-finite data or loss) adds zeros."""

    steps: int = 0
    """Steps run in the window, skipped ones included."""
    tokens: int = 0
    """Rows read in the window, skipped ones included (the throughput's)."""
    lr_sum: float = 0.0
    """Sum of the learning rates of the window's steps."""
    sums: dict[str, Tensor] = field(default_factory=dict)
    fired: Tensor | None = None
    trained: Tensor | None = None
    """(2,) int64: steps and rows of the window that updated the dictionary."""

    def add(self, name: str, value: Tensor, keep: Tensor | None = None) -> None:
        value = value.detach().float()
        if keep is not None:
            value = torch.where(keep, value, 0.0)  # never a NaN of a skipped step
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def count(self, keep: Tensor, rows: int | Tensor) -> None:
        kept = keep.long()
        step = torch.stack([kept, kept * rows])
        self.trained = step if self.trained is None else self.trained + step


@dataclass
class _Slot:
    """A dictionary being trained and everything that belongs to it."""

    name: str
    sae: SparseAutoencoder | LatentShard
    optimizer: torch.optim.Optimizer
    lr: float
    tokens_since_fired: Tensor
    window: _Window = field(default_factory=_Window)
    last_metrics: dict[str, Any] = field(default_factory=dict)
    dead_mask: Tensor | None = None
    """(width,) bool: the latents AuxK treats as dead, as of the last refresh."""
    dead: Tensor | None = None
    """Their ids (None when there are none or AuxK does not apply)."""
    dead_total: int | None = None
    """Dead latents over every rank of a latent-split dictionary (None otherwise)."""


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The training device; under a launcher, ``auto``/``cuda`` mean this rank's local GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and torch.cuda.is_available():
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {name!r} was asked for but CUDA is not available; use --device cpu"
        )
    return device


def dictionary_names(cfgs: Sequence[SAEConfig]) -> list[str]:
    """Folder names: the hookpoint alone when it identifies the dictionary, else with its label."""

    def base(cfg: SAEConfig) -> str:
        return (cfg.hookpoint or "sae").replace("/", "_")

    bases = [base(c) for c in cfgs]
    names = [
        b if bases.count(b) == 1 else f"{b}.{c.name}" for b, c in zip(bases, cfgs, strict=True)
    ]
    if len(set(names)) != len(names):
        raise ValueError(
            f"two dictionaries of this run would share a folder: {names}; vary their configs"
        )
    return names


# The device record of skipped work since the host last read it (int64 fields).
_EVENTS, _SKIPPED_ROWS, _KIND, _BATCH, _STEP, _SLOT, _BAD_ROWS, _FIRST_ROW, _ROWS = range(9)
_BATCH_HERE, _BATCH_ELSEWHERE, _LOSS = 1, 2, 3


def _fused(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` honours a ``found_inf`` flag (fused Adam does; the others refuse it)."""
    return bool(optimizer.defaults.get("fused"))


def _make_optimizer(params: list[Tensor], lr: float, cfg: TrainConfig) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = dict(lr=lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    try:
        # The fused implementation is an order of magnitude faster on CPU as well as on GPU.
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, **kwargs)


def lr_factor(step: int, cfg: TrainConfig, total_steps: int | None) -> float:
    """Multiplier of the base learning rate at 0-based ``step``: linear warm-up (scaled to the
    run's length, :meth:`TrainConfig.warmup_steps`), then an optional linear or cosine decay to
    zero over the last ``1 - lr_decay_start`` of training."""
    warmup = cfg.warmup_steps(total_steps)
    factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if total_steps and cfg.lr_decay != "none":
        start = cfg.lr_decay_start * total_steps
        if step >= start and total_steps > start:
            progress = min(1.0, (step - start) / (total_steps - start))
            decay = (
                1 - progress
                if cfg.lr_decay == "linear"
                else 0.5 * (1 + math.cos(math.pi * progress))
            )
            factor *= decay
    return factor


class _GroupReducer(Reducer):
    """Batch statistics over the data-parallel ranks."""

    def __init__(self, group: ProcessGroup) -> None:
        self.group = group

    def sum(self, tensor: Tensor) -> Tensor:
        return self.group.all_reduce_sum(tensor)

    def min(self, tensor: Tensor) -> Tensor:
        return self.group.all_reduce_min(tensor)


class Trainer:
    """Trains the dictionaries of ``configs`` on the batches of ``source``.

    Args:
        configs: one SAEConfig per dictionary; ``d_in``/``d_sae`` may be 0 (taken from the data).
        train: optimisation settings.
        source: an iterable of (batch, d_in) tensors. Sources with ``state_dict`` make the run
            resumable with the same data order. In data-parallel runs each rank's source yields
            that rank's slice of every global batch.
        output_dir: where dictionaries, metrics.jsonl, run.json and checkpoints go; None keeps
            everything in memory (no checkpoints).
        resume: continue from the newest checkpoint in ``output_dir``.
        run_config: the full configuration recorded in run.json (defaults to configs + train).
        wandb_project, run_name: optional Weights & Biases logging.
        group: this process's place in a distributed run (see :mod:`.distributed`); the
            parallelism is ``train.parallel``.
    """

    def __init__(
        self,
        configs: Sequence[SAEConfig],
        train: TrainConfig,
        source: Iterable[Tensor],
        output_dir: str | Path | None = None,
        *,
        resume: bool = False,
        run_config: dict[str, Any] | None = None,
        wandb_project: str | None = None,
        run_name: str | None = None,
        group: ProcessGroup | None = None,
    ) -> None:
        if not configs:
            raise ValueError("nothing to train: give at least one SAEConfig")
        self.configs = list(configs)
        self.cfg = train
        self.source = source
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.resume = resume
        self.run_config = run_config
        self.wandb_project = wandb_project
        self.run_name = run_name
        self.group = group or ProcessGroup()
        self.parallel = train.parallel if self.group.active else None
        self.device = resolve_device(train.device, self.group.local_rank)
        # Batch statistics span the ranks only when each rank holds a slice of the batch.
        self.reducer: Reducer = _GroupReducer(self.group) if self.parallel == "data" else Reducer()

        self.step = 0
        self.tokens = 0
        self.batches_seen = 0
        self.skipped_batches = 0
        self.scale: float | None = None
        self.slots: list[_Slot] = []
        self.names: list[str] = []
        self._checkpointed_step = -1
        self._skips = torch.zeros(9, dtype=torch.long, device=self.device)

    @property
    def is_main(self) -> bool:
        return self.group.rank == 0

    # ------------------------------------------------------------------ setup

    def _first_batch(self) -> tuple[int, Iterator[Tensor]]:
        """The data's width and an iterator over all batches (peeking when the source has no d_in)."""
        d_in = getattr(self.source, "d_in", None)
        iterator = iter(self.source)
        if d_in is None:
            try:
                first = next(iterator)
            except StopIteration:
                raise DataError("the activation source is empty: it yielded no batch") from None
            if not isinstance(first, Tensor) or first.ndim != 2:
                raise DataError(
                    f"the activation source must yield (batch, d) tensors, got {type(first).__name__}"
                )
            d_in = first.shape[1]
            iterator = itertools.chain([first], iterator)
        return int(d_in), iterator

    def _build_slots(self, d_in: int) -> None:
        resolved = [c.resolved(d_in) for c in self.configs]
        self.names = dictionary_names(resolved)
        if self.parallel == "dictionaries" and self.group.world_size > len(resolved):
            raise ConfigError(
                f"--parallel dictionaries deals {len(resolved)} dictionaries to {self.group.world_size} "
                "ranks, leaving some idle; launch at most as many ranks as dictionaries"
            )
        for index, (name, cfg) in enumerate(zip(self.names, resolved, strict=True)):
            if self.parallel == "dictionaries" and index % self.group.world_size != self.group.rank:
                continue  # another rank trains this one
            sae: SparseAutoencoder | LatentShard
            if self.parallel == "latents":
                sae = LatentShard(cfg, self.group, device=self.device)
                width = sae.d_sae
            else:
                sae = build_dictionary(cfg, device=self.device)
                width = cfg.d_sae
            module = sae.local if isinstance(sae, LatentShard) else sae
            with torch.no_grad():  # the encoder starts as the decoder's transpose, rescaled
                module.W_enc.mul_(self.cfg.encoder_init_scale)
            lr = self.cfg.learning_rate(cfg.d_sae)
            optimizer = _make_optimizer(list(sae.parameters()), lr, self.cfg)
            counter = torch.zeros(width, dtype=torch.long, device=self.device)
            self.slots.append(_Slot(name, sae, optimizer, lr, counter))

    def _record_config(self) -> dict[str, Any]:
        return self.run_config or {
            "saes": [to_dict(c) for c in self.configs],
            "train": to_dict(self.cfg),
        }

    def _check_output_dir(self) -> None:
        if self.output_dir is None:
            return
        check_writable_dir(self.output_dir)
        # Only a checkpoint or a saved dictionary is worth protecting: a run.json alone is left by
        # a run that failed before its first checkpoint (say on a corrupt shard), and the same
        # command must be able to start it over without --resume.
        has_run = bool(list_checkpoints(self.output_dir / CHECKPOINT_DIR)) or (
            (self.output_dir / INDEX_FILE).exists() or any(self.output_dir.glob(f"*/{CONFIG_FILE}"))
        )
        if has_run and not self.resume:
            raise FileExistsError(
                f"{self.output_dir} already holds a training run. Pass --resume to continue it, or "
                "choose another --output_dir (nothing was overwritten)."
            )

    # ------------------------------------------------------------------ checkpoints

    def _slot_tensors(self, slot: _Slot) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Everything a slot needs to continue, as whole-dictionary tensors (latent-split slices
        are gathered, so a checkpoint resumes with any world size that divides the work)."""
        tensors: dict[str, Tensor] = {f"sae.{k}": v for k, v in slot.sae.state_dict().items()}
        opt_tensors, opt_meta = flatten_optimizer_state(slot.optimizer.state_dict(), "opt")
        tensors.update(opt_tensors)
        tensors["tokens_since_fired"] = slot.tokens_since_fired
        if slot.dead_mask is not None:
            tensors["dead_mask"] = slot.dead_mask
        for key, value in slot.window.sums.items():
            tensors[f"window.{key}"] = value
        if slot.window.fired is not None:
            tensors["window_fired"] = slot.window.fired
        if slot.window.trained is not None:
            tensors["window_trained"] = slot.window.trained
        if isinstance(slot.sae, LatentShard):
            tensors = slot.sae.gather_state(tensors, self._latent_dim_names(slot))
        meta = {
            "optimizer": opt_meta,
            "window_steps": slot.window.steps,
            "window_tokens": slot.window.tokens,
            "window_lr_sum": slot.window.lr_sum,
            "last_metrics": slot.last_metrics,
        }
        return tensors, meta

    def _latent_dim_names(self, slot: _Slot) -> set[str]:
        """Checkpoint tensor names that have one row per latent (split in latent-split runs)."""
        names = {"tokens_since_fired", "window_fired", "dead_mask"}
        module = slot.sae.local if isinstance(slot.sae, LatentShard) else slot.sae
        for index, (name, _) in enumerate(module.named_parameters()):
            if name in LATENT_DIM_PARAMETERS:
                names.add(f"sae.{name}")
                names.update(f"opt.state.{index}.{key}" for key in ("exp_avg", "exp_avg_sq"))
        return names

    def _save_checkpoint(self) -> None:
        if self.output_dir is None or not self.cfg.checkpoint_every:
            return
        self._check_skips()  # a checkpoint never follows a bad batch that nobody has looked at
        root = self.output_dir / CHECKPOINT_DIR
        if self.is_main:
            ckpt.prepare_staging(root, self.step)
        self.group.barrier()
        slots_meta = {}
        for slot in self.slots:
            tensors, meta = self._slot_tensors(slot)  # collective in latent-split runs
            if self.parallel == "dictionaries" or self.is_main:
                ckpt.write_tensors(ckpt.staging_dir(root, self.step), slot.name, tensors)
            slots_meta[slot.name] = meta
        if self.parallel == "dictionaries":
            merged: dict[str, Any] = {}
            for part in self.group.all_gather_object(slots_meta):
                merged.update(part)
            slots_meta = merged
        self.group.barrier()  # every file is on disk before the folder becomes a checkpoint
        if self.is_main:
            data_state = (
                self.source.state_dict() if isinstance(self.source, ResumableSource) else None
            )
            state = {
                "step": self.step,
                "tokens": self.tokens,
                "batches_seen": self.batches_seen,
                "skipped_batches": self.skipped_batches,
                "scale": self.scale,
                "data": data_state,
                "config": self._record_config(),
                "dictionaries": self.names,
                "slots": slots_meta,
            }
            ckpt.commit(root, self.step, state, self.cfg.keep_checkpoints)
        self.group.barrier()
        self._checkpointed_step = self.step

    def _restore(self, path: Path) -> None:
        state = ckpt.read_state(path)
        self._check_resumable(state["config"])
        if state["dictionaries"] != self.names:
            raise RuntimeError(
                f"checkpoint {path} holds dictionaries {state['dictionaries']}, this run {self.names}"
            )
        for slot in self.slots:
            tensors = ckpt.read_tensors(path, slot.name)
            meta = state["slots"][slot.name]
            if isinstance(slot.sae, LatentShard):
                split = self._latent_dim_names(slot)
                tensors = {
                    k: slot.sae.slice_rows(v) if k in split else v for k, v in tensors.items()
                }
            slot.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
            slot.optimizer.load_state_dict(
                unflatten_optimizer_state(tensors, meta["optimizer"], "opt")
            )
            slot.tokens_since_fired.copy_(tensors["tokens_since_fired"])
            sums = {k[7:]: v.to(self.device) for k, v in tensors.items() if k.startswith("window.")}
            lr_sum = meta.get("window_lr_sum")
            if lr_sum is None:  # a checkpoint from before the learning rate was summed on the host
                lr_sum = float(sums.pop("lr", torch.zeros(())))
            trained = tensors.get("window_trained")
            if trained is None:  # ... or before skipped steps were told apart on the device
                trained = torch.tensor([meta["window_steps"], meta["window_tokens"]])
            slot.window = _Window(
                steps=meta["window_steps"],
                tokens=meta["window_tokens"],
                lr_sum=lr_sum,
                sums=sums,
                fired=tensors["window_fired"].to(self.device)
                if "window_fired" in tensors
                else None,
                trained=trained.to(self.device),
            )
            # The dead latents as the uninterrupted run had them (last refreshed at a logging
            # step, perhaps before this checkpoint), or from the counters for older checkpoints.
            if "dead_mask" in tensors:
                self._set_dead(slot, tensors["dead_mask"].to(self.device))
            else:
                self._refresh_dead(slot)
            slot.last_metrics = meta["last_metrics"]
        self.step = state["step"]
        self.tokens = state["tokens"]
        self.batches_seen = state["batches_seen"]
        self.skipped_batches = state["skipped_batches"]
        self.scale = state["scale"]
        if state["data"] is not None:
            if not isinstance(self.source, ResumableSource):
                raise RuntimeError(
                    "the checkpoint recorded a data position but this source cannot seek"
                )
            self.source.load_state_dict(state["data"])
        elif self.batches_seen:
            log.warning("the data source cannot restore its position; resuming from its start")

    def _check_resumable(self, saved: dict[str, Any]) -> None:
        current = self._record_config()
        differences = sorted(_diff(saved, current))
        blocking = [d for d in differences if d.rsplit(".", 1)[-1] not in RESUMABLE_CHANGES]
        if blocking:
            raise RuntimeError(
                "cannot resume: the configuration differs from the checkpoint's in "
                + ", ".join(blocking)
                + ". Resume with the same configuration, or start a new run in another output_dir."
            )

    # ------------------------------------------------------------------ the loop

    def _total_steps(self) -> int | None:
        total = getattr(self.source, "total_batches", None)
        if self.cfg.max_steps:
            return min(self.cfg.max_steps, total) if total else self.cfg.max_steps
        return total

    def _initialise_from_data(self, x: Tensor) -> float:
        """Input scale and decoder bias from the first batch (restored on resume, never redone).

        In data-parallel runs the ranks' slices are gathered first, so every rank starts from
        the statistics of the whole first batch.
        """
        if self.parallel == "data":
            x = self.group.all_gather(x)
        scale = input_scale(x) if self.cfg.normalize_activations else 1.0
        x = x * scale
        if self.cfg.b_dec_init == "zeros":
            center = torch.zeros_like(x[0])
        elif self.cfg.b_dec_init == "geometric_median":
            center = geometric_median(x)
        else:
            center = x.mean(0)
        with torch.no_grad():
            for slot in self.slots:
                slot.sae.b_dec.copy_(center.to(slot.sae.b_dec))
        if self.cfg.latent_init == "data":
            for slot in self.slots:
                module = slot.sae.local if isinstance(slot.sae, LatentShard) else slot.sae
                first = slot.sae.start if isinstance(slot.sae, LatentShard) else 0
                init_from_data(
                    module.W_dec,
                    module.W_enc,
                    x - center,
                    slot.sae.cfg.seed,
                    self.cfg.encoder_init_scale,
                    first,
                )
        return scale

    def _check_batch(self, batch: Tensor, d_in: int) -> tuple[Tensor | None, Tensor | None]:
        """The batch on the training device in float32 (None when it must be skipped now), and
        a 0-d device flag that is True when it holds NaN or infinite values (None when the host
        checked it already).

        Until the first batch has initialised the run, the host checks finiteness itself (that
        batch is read back anyway). Afterwards the check stays on the device: non-finite rows
        are zeroed, the flag makes every update of the step a no-op, and :meth:`_check_skips`
        applies ``nan_policy`` on the next logging or checkpoint step.
        """
        if not isinstance(batch, Tensor) or batch.ndim != 2:
            shape = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
            raise DataError(f"batch {self.batches_seen} is not a (batch, d) tensor: {shape}")
        if batch.shape[1] != d_in:
            raise DataError(
                f"batch {self.batches_seen} has width {batch.shape[1]} but the run trains on d_in={d_in}; "
                "all activations must come from the same hookpoint"
            )
        x = batch.to(self.device, torch.float32, non_blocking=True)
        if x.shape[0] == 0 and self.parallel != "data":
            return None, None
        if self.scale is None:
            return (x if self._finite_on_host(x) else None), None
        finite_rows = torch.isfinite(x).all(dim=1)  # (N,)
        bad_here = ~finite_rows.all()
        bad = bad_here
        if self.parallel == "data":  # every rank skips the step if any rank's slice is bad
            bad = self.group.all_reduce_sum(bad_here.float().reshape(1))[0] > 0
        non_finite = ~finite_rows
        self._note(
            bad,
            kind=torch.where(bad_here, _BATCH_HERE, _BATCH_ELSEWHERE),
            slot=-1,
            bad_rows=non_finite.sum(),
            first_row=non_finite.to(torch.uint8).argmax(),
            rows=x.shape[0],
            skipped_rows=self._global_rows(x),
        )
        # NaN stays out of the kernels (and out of BatchTopK's threshold); the step is skipped.
        return torch.where(finite_rows.unsqueeze(1), x, 0.0), bad

    def _finite_on_host(self, x: Tensor) -> bool:
        """The synchronous check of a batch's finiteness (before initialisation)."""
        finite = bool(torch.isfinite(x).all())
        if self._everyone(finite):
            return True
        if finite:
            what = f"batch {self.batches_seen} holds NaN or infinite activations on another rank"
        else:
            bad_rows = (~torch.isfinite(x).all(dim=1)).nonzero().squeeze(1)
            what = self._describe_batch(
                self.batches_seen, bad_rows.numel(), x.shape[0], int(bad_rows[0])
            )
        self._skipped(what)
        return False

    def _global_rows(self, x: Tensor) -> int:
        """Rows of the whole batch, over the ranks that share it."""
        return x.shape[0] * (self.group.world_size if self.parallel == "data" else 1)

    def _everyone(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank that shares this batch (data parallelism)."""
        if self.parallel != "data":
            return flag
        failures = torch.full((1,), 0.0 if flag else 1.0, device=self.device)
        return self.group.all_reduce_sum(failures).item() == 0

    def _note(
        self,
        event: Tensor,
        *,
        kind: Tensor | int,
        slot: int,
        bad_rows: Tensor | int = 0,
        first_row: Tensor | int = 0,
        rows: int = 0,
        skipped_rows: int = 0,
    ) -> None:
        """Count a skipped batch (``event``, a 0-d bool) in the device record, and describe it
        there if it is the first since the host last looked. Nothing is read back."""

        def long(value: Tensor | int) -> Tensor:
            if isinstance(value, Tensor):
                return value.to(torch.long)
            return torch.full((), value, dtype=torch.long, device=self.device)

        record = self._skips
        details = torch.stack(
            [long(v) for v in (kind, self.batches_seen, self.step, slot, bad_rows, first_row, rows)]
        )
        first = event & (record[_EVENTS] == 0)
        record[_KIND:].copy_(torch.where(first, details, record[_KIND:]))
        happened = event.to(torch.long)
        record[:_KIND].add_(torch.stack([happened, happened * skipped_rows]))

    def _check_skips(self) -> None:
        """Read the device record of skipped batches (one host synchronisation: logging and
        checkpoint steps only) and apply ``nan_policy`` and ``max_skipped_batches``."""
        events, skipped_rows, kind, batch, step, slot, bad_rows, first_row, rows = (
            self._skips.tolist()
        )
        if not events:
            return
        self._skips.zero_()
        self.tokens -= skipped_rows
        if kind == _LOSS:
            what = f"dictionary {self.slots[slot].name} got a non-finite loss or gradient at step {step}"
        elif kind == _BATCH_ELSEWHERE:
            what = f"batch {batch} holds NaN or infinite activations on another rank"
        else:
            what = self._describe_batch(batch, bad_rows, rows, first_row)
        self._skipped(what, events)

    @staticmethod
    def _describe_batch(batch: int, bad_rows: int, rows: int, first_row: int) -> str:
        return (
            f"batch {batch} holds NaN or infinite activations "
            f"({bad_rows} of {rows} rows, first at row {first_row} of the shuffled batch)"
        )

    def _skipped(self, what: str, count: int = 1) -> None:
        """``count`` batches were skipped, the first of them because of ``what``."""
        if self.cfg.nan_policy == "stop":
            raise NonFiniteError(
                f"{what}; stopping (nan_policy=stop). Checkpoints so far are intact."
            )
        self.skipped_batches += count
        more = f" (and {count - 1} more by step {self.step})" if count > 1 else ""
        log.warning("%s%s; skipped (%d so far)", what, more, self.skipped_batches)
        if self.skipped_batches > self.cfg.max_skipped_batches:
            raise NonFiniteError(
                f"{what}; more than max_skipped_batches={self.cfg.max_skipped_batches} batches were "
                "skipped, so the data is likely broken. Checkpoints so far are intact."
            )

    # ------------------------------------------------------------------ dead latents

    def _refresh_dead(self, slot: _Slot) -> None:
        """AuxK's dead latents from the counters: on logging steps and at the start only, since
        their number is read back to the host (see the module's docstring)."""
        if self.cfg.auxk_alpha > 0 and slot.sae.architecture in ("topk", "batchtopk"):
            self._set_dead(slot, slot.tokens_since_fired >= self.cfg.dead_tokens)

    def _set_dead(self, slot: _Slot, mask: Tensor) -> None:
        slot.dead_mask = mask.to(torch.bool)
        ids = slot.dead_mask.nonzero().squeeze(1)
        slot.dead = ids if ids.numel() else None
        if isinstance(slot.sae, LatentShard):
            count = torch.full((1,), ids.numel(), dtype=torch.long, device=self.device)
            slot.dead_total = int(self.group.all_reduce_sum(count).item())

    # ------------------------------------------------------------------ one step

    def _train_slot(
        self,
        slot: _Slot,
        index: int,
        x: Tensor,
        lr_mult: float,
        bad: Tensor | None,
        rows: int | Tensor,
    ) -> None:
        """One optimisation step of one dictionary, with no host synchronisation.

        ``bad`` flags a batch with non-finite values; ``rows`` counts the batch's rows over the
        ranks that share it (a device tensor in data-parallel runs).
        """
        sae, cfg = slot.sae, self.cfg
        warm = (
            min(1.0, (self.step + 1) / cfg.sparsity_warmup_steps)
            if cfg.sparsity_warmup_steps
            else 1.0
        )
        ctx = StepContext(
            dead_latents=slot.dead,
            dead_total=slot.dead_total,
            k_aux=cfg.k_aux or default_k_aux(sae.d_in),
            auxk_alpha=cfg.auxk_alpha,
            sparsity_coefficient=cfg.sparsity_weight(sae.architecture) * warm,
            jumprelu_bandwidth=cfg.jumprelu_bandwidth,
            reduce=self.reducer,
        )
        buffers = [b.detach().clone() for b in sae.buffers()]  # put back if the step is skipped
        use_autocast = cfg.autocast and x.is_cuda
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=use_autocast):
            out = sae.training_forward(x, ctx)
        # What the metrics need from the codes, taken now: the codes (33M entries for a JumpReLU
        # at initialisation) are then released as soon as the backward pass is done with them.
        fired = self.reducer.sum(out.codes.firing_counts())  # dead statistics agree on all ranks
        active = None if "l0" in out.terms else self.reducer.sum(out.codes.active_count())
        cosine = self.reducer.sum(
            torch.nn.functional.cosine_similarity(out.recon.detach().float(), x, dim=1).sum()
        )
        loss, terms = out.loss, out.terms
        del out

        loss_bad = ~torch.isfinite(loss.detach())
        loss.backward()
        params = list(sae.parameters())
        if self.parallel == "data":
            # Each rank's loss is its share of the batch's loss: summed gradients are the batch's.
            # The loss flag rides along, so every rank skips the same steps.
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in params if p.grad is not None]
            flag = loss_bad.to(grads[0].dtype)  # the gradients' dtype: one flat buffer
            flat_all_reduce_([*grads, flag], self.group)
            loss_bad = flag > 0
        if sae.normalize_decoder:
            sae.remove_gradient_parallel_to_decoder_directions()
        if cfg.grad_clip:
            if isinstance(sae, LatentShard):
                norm = sae.clip_grad_norm_(cfg.grad_clip)
            else:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            loss_bad = loss_bad | ~torch.isfinite(norm)
        skip = loss_bad if bad is None else bad | loss_bad
        self._note(loss_bad if bad is None else loss_bad & ~bad, kind=_LOSS, slot=index)

        for group in slot.optimizer.param_groups:
            group["lr"] = slot.lr * lr_mult
        if _fused(slot.optimizer):
            # Fused Adam leaves parameters and moments untouched when found_inf is 1, as it does
            # for torch.amp.GradScaler: the skip is decided on the device.
            slot.optimizer.found_inf = skip.float()  # type: ignore[attr-defined]
            slot.optimizer.step()
        elif not bool(skip):  # an unfused optimizer refuses found_inf: a read per step
            slot.optimizer.step()
        slot.optimizer.zero_grad(set_to_none=True)
        sae.after_optimizer_step()
        for buffer, before in zip(sae.buffers(), buffers, strict=True):
            buffer.copy_(torch.where(skip, before, buffer))

        keep = ~skip
        fired.masked_fill_(skip, 0)
        slot.tokens_since_fired.add_(keep.long() * rows)
        slot.tokens_since_fired.masked_fill_(fired > 0, 0)

        window = slot.window
        window.steps += 1
        window.tokens += self._global_rows(x)
        window.lr_sum += slot.lr * lr_mult
        window.count(keep, rows)
        window.fired = fired if window.fired is None else window.fired + fired
        window.add("cosine", cosine / rows, keep)
        if active is not None:  # latent-split runs report the merged L0 themselves
            window.add("l0", active / rows, keep)
        for key, value in terms.items():
            window.add(key, value, keep)

    def _metrics(self, slot: _Slot, elapsed: float) -> dict[str, Any]:
        window = slot.window
        trained_steps, trained_rows = (
            window.trained.tolist() if window.trained is not None else (0, 0)
        )
        names = list(window.sums)
        sums = torch.stack([window.sums[k] for k in names]).tolist() if names else []
        means = {k: v / max(trained_steps, 1) for k, v in zip(names, sums, strict=True)}
        scale2 = (self.scale or 1.0) ** 2
        dead = (slot.tokens_since_fired >= self.cfg.dead_tokens).float().sum()
        fired = window.fired
        if isinstance(slot.sae, LatentShard):  # whole-dictionary figures from the slices
            dead = self.group.all_reduce_sum(dead.clone())
            fired = self.group.all_gather(fired) if fired is not None else None
        d_sae = self.configs[self.names.index(slot.name)].resolved(slot.sae.d_in).d_sae
        record: dict[str, Any] = {
            "step": self.step,
            "tokens": self.tokens,
            "dictionary": slot.name,
            "fvu": means.get("fvu"),
            "explained_variance": 1 - means["fvu"] if "fvu" in means else None,
            "mse": means.get("mse", 0.0) / scale2,
            "cosine": means.get("cosine"),
            "l0": means.get("l0"),
            "dead_fraction": dead.item() / d_sae,
            "lr": window.lr_sum / max(window.steps, 1),
            "skipped_batches": self.skipped_batches,
            "tokens_per_second": window.tokens / elapsed if elapsed > 0 else None,
        }
        for key in ("auxk", "l0_penalty", "l1"):
            if key in means:
                record[key] = means[key]
        if fired is not None and trained_rows:
            density = fired.double() / trained_rows
            log_density = density[density > 0].log10().clamp(DENSITY_EDGES[0], DENSITY_EDGES[-1])
            counts = torch.histc(
                log_density,
                bins=len(DENSITY_EDGES) - 1,
                min=DENSITY_EDGES[0],
                max=DENSITY_EDGES[-1],
            )
            record["density_histogram"] = {
                "log10_edges": DENSITY_EDGES,
                "counts": [int(c) for c in counts.tolist()],
                "never_fired": int((density == 0).sum()),
            }
        return record

    def _log(self, logger: MetricsLogger, elapsed: float) -> None:
        for slot in self.slots:
            if slot.window.steps == 0:
                continue
            slot.last_metrics = self._metrics(slot, elapsed)
            logger.log(slot.last_metrics)
            slot.window = _Window()

    def fit(self) -> list[TrainResult]:
        """Run training to the end of the data (or max_steps) and save the dictionaries."""
        if self.is_main:
            self._check_output_dir()
        self.group.barrier()
        d_in, batches = self._first_batch()
        self._build_slots(d_in)

        resume_step = None
        if self.resume and self.output_dir is not None:
            checkpoints = list_checkpoints(self.output_dir / CHECKPOINT_DIR)
            if checkpoints:
                self._restore(checkpoints[-1])
                resume_step = self._checkpointed_step = self.step
                if isinstance(self.source, ResumableSource):
                    batches = iter(self.source)  # from the restored position
                log.info("resumed from %s (step %d)", checkpoints[-1], self.step)
            elif (self.output_dir / RUN_FILE).exists():
                log.warning("no checkpoint in %s: starting the run over", self.output_dir)
        # In dictionaries mode every rank logs the metrics of its own dictionaries.
        writes_log = self.output_dir is not None and (
            self.is_main or self.parallel == "dictionaries"
        )
        if self.output_dir is not None and self.is_main:
            atomic_write_json(
                self.output_dir / RUN_FILE,
                {
                    "run_name": self.run_name,
                    "world_size": self.group.world_size,
                    "config": self._record_config(),
                },
            )
        metrics_name = METRICS_FILE if self.is_main else f"metrics.rank{self.group.rank}.jsonl"
        logger = MetricsLogger(
            self.output_dir / metrics_name if self.output_dir else Path("/dev/null"),
            resume_step=resume_step,
            wandb_project=self.wandb_project if self.is_main else None,
            run_name=self.run_name,
            config=self._record_config(),
            enabled=writes_log,
        )
        total = self._total_steps()
        bar = tqdm(
            total=total,
            initial=self.step,
            disable=not (self.cfg.progress and self.is_main),
            unit="step",
            dynamic_ncols=True,
        )
        if resume_step is None:
            for slot in self.slots:
                self._refresh_dead(slot)
        window_start = time.perf_counter()
        try:
            while not (self.cfg.max_steps and self.step >= self.cfg.max_steps):
                batch = next(batches, None)
                if batch is None:
                    break
                x, bad = self._check_batch(batch, d_in)
                self.batches_seen += 1
                if x is None:
                    continue
                if self.scale is None:
                    self.scale = self._initialise_from_data(x)
                x = x * self.scale
                lr_mult = lr_factor(self.step, self.cfg, total)
                rows: int | Tensor = x.shape[0]
                if self.parallel == "data":  # slices may differ at the end of an epoch
                    rows = self.reducer.sum(torch.full((), x.shape[0], device=self.device))
                for index, slot in enumerate(self.slots):
                    self._train_slot(slot, index, x, lr_mult, bad, rows)
                self.step += 1
                self.tokens += self._global_rows(x)
                bar.update(1)
                if self.step % self.cfg.log_every == 0:
                    self._check_skips()
                    self._log(logger, time.perf_counter() - window_start)
                    window_start = time.perf_counter()
                    for slot in self.slots:
                        self._refresh_dead(slot)
                    if self.slots:
                        first = self.slots[0].last_metrics
                        bar.set_postfix(
                            fvu=f"{first.get('fvu', 0):.3f}", l0=f"{first.get('l0', 0):.1f}"
                        )
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                    self._save_checkpoint()
            self._check_skips()
            if self.step == 0 or self.tokens == 0:
                raise DataError(
                    "no usable batch was read: the activation source is empty or every batch was skipped"
                )
            self._log(logger, time.perf_counter() - window_start)
            warmup = self.cfg.warmup_steps(total)
            if self.step < warmup and self.is_main:
                log.warning(
                    "the run ended after %d steps, before its %d-step learning-rate warm-up was "
                    "over, so it never trained at the full learning rate: lower lr_warmup_steps "
                    "or train on more data",
                    self.step,
                    warmup,
                )
            if self.cfg.checkpoint_every and self._checkpointed_step != self.step:
                self._save_checkpoint()  # so that a longer run can resume from the end of this one
            return self._finish()
        except PeerLostError:
            log.error("rank %d: a peer was lost; stopping", self.group.rank)
            raise
        finally:
            bar.close()
            logger.close()

    def _finish(self) -> list[TrainResult]:
        results = []
        saves = self.output_dir is not None and (self.is_main or self.parallel == "dictionaries")
        for slot in self.slots:
            whole = slot.sae.full_dictionary() if isinstance(slot.sae, LatentShard) else slot.sae
            final = copy.deepcopy(whole).for_inference()
            final.fold_input_scale(self.scale or 1.0)
            final.eval()
            path = None
            if saves and self.output_dir is not None:
                path = save_dictionary(
                    final,
                    self.output_dir / slot.name,
                    training={
                        "train": to_dict(self.cfg),
                        "steps": self.step,
                        "tokens": self.tokens,
                    },
                    metrics=slot.last_metrics,
                )
            results.append(TrainResult(slot.name, path, final, slot.last_metrics))
        self.group.barrier()
        if self.output_dir is not None and self.is_main:
            configs = [
                c.resolved(self.slots[0].sae.d_in if self.slots else c.d_in) for c in self.configs
            ]
            saved = {
                name: _saved_config(self.output_dir / name, cfg)
                for name, cfg in zip(self.names, configs, strict=True)
            }
            write_index(self.output_dir, saved)
        return results


def _saved_config(folder: Path, fallback: SAEConfig) -> SAEConfig:
    """The config a dictionary was saved with (BatchTopK is saved as JumpReLU)."""
    from ..dictionaries.io import read_config

    try:
        return read_config(folder)[0]
    except FileNotFoundError:
        return fallback


def _diff(a: Any, b: Any, path: str = "") -> Iterator[str]:
    """Dotted paths where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in a.keys() | b.keys():
            yield from _diff(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _diff(x, y, f"{path}[{i}]")
    elif a != b and not (
        isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)
    ):
        yield path


def read_run(output_dir: str | Path) -> dict[str, Any]:
    """The run.json of a training output directory."""
    return read_json(Path(output_dir) / RUN_FILE, what="run record")
