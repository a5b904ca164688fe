"""The stages of ``saekit demo``, each a plain function over real saekit parts.

world scenes -> cache (adapter + writer) -> train (trainer on the cache reader) -> score
(held-out cache + the scenes' factor labels). The same calls a user makes on a real model;
only the models and the labels come from the testbed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapters import load_adapter
from ..cache import CacheConfig, CacheReader, cache_activations, open_training_source
from ..cache.rows import RowFilter
from ..dictionaries import SAEConfig, SparseAutoencoder, load_dictionary, read_index
from ..dictionaries.io import INDEX_FILE, read_config
from ..evaluation.factors import FactorLabels, labels_from_scenes, sample_activations
from ..evaluation.suite import CacheEvaluation, evaluate_on_cache
from ..testbed import world
from ..training import TrainConfig, Trainer


@dataclass
class WorldSplit:
    """Scenes of the testbed world and what the models are fed with (sample id i = scenes[i])."""

    scenes: list[world.Scene]
    labels: FactorLabels
    prompts: list[str]
    """The canonical caption of each scene (the text-to-image model's inputs)."""
    images_dir: Path | None
    """Rendered scenes as PNG files (the contrastive model's inputs), when written."""


def make_split(n: int, seed: int, images_dir: Path | None = None) -> WorldSplit:
    """``n`` single-object scenes (the labels then say which object a prompt or image shows)."""
    scenes = world.sample_scenes(n, seed=seed, objects=1)
    if images_dir is not None:
        images_dir.mkdir(parents=True, exist_ok=True)
        width = len(str(max(n - 1, 0)))  # zero-padded: the folder's sorted order is sample order
        for i, image in enumerate(world.to_pil(world.render(scenes))):
            image.save(images_dir / f"{i:0{width}d}.png")
    prompts = [s.caption() for s in scenes]
    return WorldSplit(scenes, labels_from_scenes(scenes), prompts, images_dir)


def cache_hookpoint(
    model_dir: Path,
    inputs: Any,
    hookpoint: str,
    output_dir: Path,
    *,
    seed: int,
    rows: RowFilter | None = None,
    model_options: dict[str, Any] | None = None,
) -> Path:
    """Cache one hookpoint of a shipped model on ``inputs`` (float32 rows)."""
    adapter = load_adapter(str(model_dir), **(model_options or {}))
    cfg = CacheConfig(
        hookpoints=[hookpoint],
        output_dir=str(output_dir),
        dtype="float32",
        batch_size=64,
        rows_per_shard=1 << 15,
        shuffle_buffer_rows=1 << 17,
        seed=seed,
        rows=rows or RowFilter(),
        progress=False,  # the demo prints one line per stage
    )
    cache_activations(adapter, inputs, cfg)
    return output_dir


@dataclass
class TrainedDictionary:
    sae: SparseAutoencoder
    path: Path
    metrics: dict[str, Any]
    train_rows: int


def train_topk(
    cache_dir: Path,
    output_dir: Path,
    *,
    expansion: int,
    k: int,
    epochs: int,
    batch_size: int,
    seed: int,
) -> TrainedDictionary:
    """A TopK dictionary (Gao et al. 2024) on every row of a one-hookpoint cache.

    A dictionary already finished in ``output_dir`` is reused: the demo records its settings
    (``demo-config.json``) and refuses a folder written with others, so a rerun of the same
    command would train the same dictionary again (and the trainer would refuse the folder).
    """
    reader = open_training_source(
        cache_dir, batch_size=batch_size, epochs=epochs, shuffle=True, seed=seed
    )
    if (output_dir / INDEX_FILE).is_file():
        (entry,) = read_index(output_dir)
        path = output_dir / entry["path"]
        metrics = read_config(path)[1].get("metrics") or {}
        return TrainedDictionary(load_dictionary(path), path, metrics, reader.n_rows)
    d_in = reader.d_in
    sae_cfg = SAEConfig(
        architecture="topk", k=k, d_sae=expansion * d_in, seed=seed, **reader.provenance
    )
    train = TrainConfig(
        batch_size=batch_size,
        epochs=epochs,
        lr_warmup_steps=20,
        log_every=25,
        checkpoint_every=0,
        data_seed=seed,
    )
    batches: Any = reader  # yields activation tensors (no metadata was asked for)
    (result,) = Trainer([sae_cfg], train, batches, output_dir).fit()
    assert result.path is not None  # the trainer had an output directory
    return TrainedDictionary(result.sae, result.path, result.metrics, reader.n_rows)


@dataclass
class Scored:
    """A dictionary on its held-out cache: metrics, factor scores, and each input's activation."""

    evaluation: CacheEvaluation
    sample_acts: torch.Tensor
    """``(n_samples, d_sae)``: each held-out input's largest activation of each latent."""


def score_held_out(sae: SparseAutoencoder, cache_dir: Path, split: WorldSplit) -> Scored:
    """Reconstruction on held-out rows, and every latent scored against every factor value."""
    evaluation = evaluate_on_cache(sae, cache_dir, labels=split.labels)
    reader = CacheReader(cache_dir, None, 4096, epochs=1, shuffle=False, metadata=True)
    try:
        acts, _ = sample_activations(sae, reader, len(split.scenes))
    finally:
        reader.close()
    return Scored(evaluation, acts)


def top_inputs(sample_acts: torch.Tensor, latent: int, count: int) -> list[int]:
    """The held-out inputs on which ``latent`` fires most, strongest first."""
    column = sample_acts[:, latent]  # (n_samples,)
    order = torch.argsort(column, descending=True)[:count]
    return [int(i) for i in order if column[i] > 0]
