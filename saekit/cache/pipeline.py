"""A caching run: inputs -> model with hooks -> per-token rows -> shuffled shards on disk.

    adapter = CustomAdapter(model)
    result = cache_activations(adapter, tokens, CacheConfig(hookpoints=["blocks.3"], output_dir="runs/c"))

The run is resumable: the same command after a crash (or a full disk) continues after the last
shuffle group whose shards are all written, and writes the same rows an uninterrupted run
would. A directory written by a different configuration is refused, never appended to.
Under torchrun (RANK / WORLD_SIZE) each rank caches every WORLD_SIZE-th input into its own
directory, and the last rank to finish merges them into one cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch import Tensor
from tqdm.auto import tqdm

from .. import _dist
from ..adapters.base import ForwardContext, ModelAdapter
from ..configuration import ConfigError
from .capture import ActivationCapture, Hookpoint, resolve_hookpoints
from .check import damaged_shards
from .config import CacheConfig, content_config
from .disk import check_space, human_bytes
from .inputs import SkipReport, as_input_source, iter_batches, rank_indices
from .manifest import MANIFEST, GroupRecord, HookpointRecord, Manifest, load_manifest, save_manifest
from .merge import find_rank_dirs, merge_cache, rank_dir_name
from .rows import METADATA_BYTES_PER_ROW, metadata_columns
from .shards import STORAGE_DTYPES, CacheError, block_rows_for
from .writer import ShardWriter

log = logging.getLogger("saekit.cache")

LOCK_FILE = ".lock"


@dataclass
class CacheResult:
    """What a caching run (of one rank) produced."""

    path: Path
    """The directory this rank wrote."""
    rows: dict[str, int]
    """Rows per hookpoint in that directory."""
    shards: int
    """Shard files in that directory."""
    bytes_written: int
    """Bytes of shards written by this run (not counting a previous, interrupted one)."""
    inputs: int
    """Inputs of this rank."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Inputs skipped, by reason."""
    resumed_from_batch: int = 0
    """The input batch a resumed run started at (0: a fresh run)."""
    seconds: float = 0.0
    merged: Path | None = None
    """The merged cache, when this rank was the last of a sharded run to finish."""
    repaired: list[str] = field(default_factory=list)
    """Damaged shards (missing, truncated, corrupt) found by this rerun and written again."""


@contextlib.contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Refuse a second process writing the same cache directory."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(
                f"another process is writing the cache in {directory}; wait for it to finish or "
                "choose another output_dir"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _differences(saved: Any, current: Any, path: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(saved.keys() | current.keys()):
            out += _differences(saved.get(key), current.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if saved == current else [path]


def _open_directory(directory: Path, manifest: Manifest) -> Manifest | None:
    """The manifest of an earlier run of the same config in ``directory`` (None if new)."""
    if not (directory / MANIFEST).exists():
        leftovers = [p.name for p in directory.iterdir() if p.name != LOCK_FILE]
        if leftovers:
            raise CacheError(
                f"{directory} is not empty ({', '.join(sorted(leftovers)[:5])}) and holds no cache "
                "manifest; choose an empty or new output_dir"
            )
        return None
    saved = load_manifest(directory)
    if not isinstance(saved, Manifest):
        raise CacheError(f"{directory} holds a merged cache; write a new run to another output_dir")
    if saved.cache_id != manifest.cache_id or (saved.rank, saved.world_size) != (
        manifest.rank,
        manifest.world_size,
    ):
        differences = _differences(saved.config, manifest.config) or ["rank/world size"]
        raise CacheError(
            f"{directory} holds a cache written by a different configuration (it differs in "
            f"{', '.join(differences[:8])}); it is not appended to. Use the original settings to "
            "resume it, or choose another output_dir"
        )
    return saved


def _remove_stale_temporaries(directory: Path) -> None:
    for path in directory.glob("*/.*.tmp"):
        path.unlink(missing_ok=True)


class _Progress:
    """A progress bar over inputs showing the rows/s and MB/s captured."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = tqdm(
            total=total, initial=initial, unit="input", disable=not enabled, dynamic_ncols=True
        )
        self.began = time.perf_counter()
        self.rows = 0
        self.bytes = 0
        self._shown = 0.0

    def update(self, inputs: int) -> None:
        self.bar.update(inputs)
        now = time.perf_counter()
        if now - self._shown > 0.5:
            elapsed = max(now - self.began, 1e-9)
            self.bar.set_postfix_str(
                f"{self.rows / elapsed:,.0f} rows/s, {self.bytes / elapsed / 1e6:.1f} MB/s"
            )
            self._shown = now

    def close(self) -> None:
        self.bar.close()


def cache_activations(
    adapter: ModelAdapter,
    inputs: Any,
    cfg: CacheConfig,
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> CacheResult:
    """Cache the activations of ``adapter``'s model on ``inputs`` as ``cfg`` says.

    ``inputs`` is an InputSource (ImageFolder, PromptFile, ImagePromptPairs, TensorInputs), a
    tensor, a list of prompts, or a map-style dataset. ``rank`` / ``world_size`` default to the
    process group or the RANK / WORLD_SIZE environment variables.
    """
    began = time.perf_counter()
    rank = _dist.rank() if rank is None else rank
    world_size = _dist.world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside a world of size {world_size}")
    source = as_input_source(inputs)
    n_inputs = min(len(source), cfg.data.limit) if cfg.data.limit else len(source)
    hookpoints = resolve_hookpoints(adapter.root(), cfg.hookpoints, cfg.capture)
    if adapter.root().training:
        log.warning(
            "the model is in training mode (dropout is active): its rows are random, and a "
            "resumed run would not repeat them; call model.eval() before caching"
        )
    cfg.rows.check(adapter)
    storage_dtype = STORAGE_DTYPES[cfg.dtype]

    config = content_config(cfg)
    config["model_identity"] = adapter.identity()
    config["inputs"] = {"count": n_inputs, "fingerprint": source.fingerprint()}
    config["resolved_hookpoints"] = [h.name for h in hookpoints]
    cache_id = xxhash.xxh3_128_hexdigest(json.dumps(config, sort_keys=True, default=str).encode())
    root = Path(cfg.output_dir)
    directory = root / rank_dir_name(rank, world_size) if world_size > 1 else root
    indices = rank_indices(n_inputs, rank, world_size)
    manifest = Manifest(
        cache_id=cache_id,
        config=config,
        adapter=adapter.family or type(adapter).__name__,
        model=adapter.model_name or cfg.model,
        model_revision=adapter.revision or cfg.revision,
        dtype=cfg.dtype,
        streams=list(adapter.streams),
        rank=rank,
        world_size=world_size,
        inputs=len(indices),
    )
    if world_size == 1 and root.is_dir() and find_rank_dirs(root):
        raise CacheError(
            f"{root} holds the rank directories of a sharded run; choose another output_dir"
        )

    with _exclusive(directory):
        saved = _open_directory(directory, manifest)
        redo: set[tuple[int, str, int]] = set()
        repaired: list[str] = []
        if saved is not None:
            manifest = saved
            _remove_stale_temporaries(directory)
            damaged = damaged_shards(directory, manifest, full=True if cfg.verify else None)
            if damaged:
                log.warning(
                    "%d damaged shard(s) in %s (first: %s); rewriting them",
                    len(damaged),
                    directory,
                    damaged[0].problem,
                )
                redo = {(d.record.group, d.hookpoint, d.record.index) for d in damaged}
                repaired = [d.record.file for d in damaged]
                for d in damaged:  # so that nothing reads them before they are rewritten
                    d.path.unlink(missing_ok=True)
                _repair(
                    adapter,
                    source,
                    cfg,
                    hookpoints,
                    storage_dtype,
                    directory,
                    manifest,
                    indices,
                    redo,
                )
            if manifest.complete:
                if not damaged:
                    log.info("%s already holds the complete cache; nothing to do", directory)
                result = _result(directory, manifest, 0, manifest.groups[-1].end_batch, began)
                result.repaired = repaired
                return result
        result = _run(
            adapter, source, cfg, hookpoints, storage_dtype, directory, manifest, indices, redo
        )
        result.repaired = repaired
        result.seconds = time.perf_counter() - began
    if world_size > 1:
        result.merged = _merge_if_last(root)
    return result


def _result(
    directory: Path, manifest: Manifest, bytes_written: int, resumed_from: int, began: float
) -> CacheResult:
    return CacheResult(
        path=directory,
        rows={name: h.rows for name, h in manifest.hookpoints.items()},
        shards=manifest.shard_count,
        bytes_written=bytes_written,
        inputs=manifest.inputs,
        skipped=dict(manifest.groups[-1].skipped) if manifest.groups else {},
        resumed_from_batch=resumed_from,
        seconds=time.perf_counter() - began,
    )


def _rows_of(
    adapter: ModelAdapter,
    cfg: CacheConfig,
    storage_dtype: torch.dtype,
    hookpoint: Hookpoint,
    tensor: Tensor,
    context: ForwardContext,
) -> tuple[Any, Tensor]:
    """The rows a hooked tensor gives (after the row filter), and their values ``(n, d)`` in the
    storage dtype, owned by the writer: one function, so a repair computes the same bytes."""
    rows = adapter.flatten(hookpoint.module, tensor, context)
    keep = cfg.rows.mask(rows, adapter.streams)
    if keep is not None:
        rows = rows.select(keep)  # a copy
    return rows, rows.values.to(storage_dtype, copy=keep is None)


def _repair(
    adapter: ModelAdapter,
    source: Any,
    cfg: CacheConfig,
    hookpoints: list[Hookpoint],
    storage_dtype: torch.dtype,
    directory: Path,
    manifest: Manifest,
    indices: range,
    redo: set[tuple[int, str, int]],
) -> None:
    """Write the damaged shards ``redo`` of complete groups again, and nothing else.

    A group's rows are a function of its input batches and the seed (the same fact a resume
    relies on), so recomputing the groups that hold damaged shards gives their bytes exactly;
    the writer skips every shard of those groups that is intact. Shards of the group a resumed
    run is still writing are left to that run (``_run`` gets the same ``redo``).
    """
    ends = {g.index: g for g in manifest.groups}
    groups = sorted({group for group, _, _ in redo if group in ends})
    if not groups:
        return
    writer = ShardWriter(
        directory, manifest, rows_per_shard=cfg.rows_per_shard, seed=cfg.seed, redo=redo
    )

    def on_capture(hookpoint: Hookpoint, tensor: Tensor, context: ForwardContext) -> None:
        rows, values = _rows_of(adapter, cfg, storage_dtype, hookpoint, tensor, context)
        if len(rows):
            writer.add(hookpoint.name, values, metadata_columns(rows))

    try:
        with ActivationCapture(
            adapter, hookpoints, on_capture, early_stop=cfg.early_stop
        ) as capture:
            for group in groups:
                start = ends[group - 1].end_batch if group else 0
                batches = iter_batches(
                    source, indices, cfg.batch_size, SkipReport(), start_batch=start
                )
                with contextlib.closing(batches):  # stops the loader thread at the break
                    for loaded in batches:
                        if loaded.index >= ends[group].end_batch:
                            break
                        capture.run(loaded.batch)
                writer.end_group(ends[group])
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _run(
    adapter: ModelAdapter,
    source: Any,
    cfg: CacheConfig,
    hookpoints: list[Hookpoint],
    storage_dtype: torch.dtype,
    directory: Path,
    manifest: Manifest,
    indices: range,
    redo: set[tuple[int, str, int]] | None = None,
) -> CacheResult:
    last = manifest.groups[-1] if manifest.groups else None
    start_batch = last.end_batch if last else 0
    skips = SkipReport(counts=dict(last.skipped) if last else {})
    group = len(manifest.groups)
    is_new = not (directory / MANIFEST).exists()
    if start_batch:
        log.info("resuming %s at input batch %d (group %d)", directory, start_batch, group)

    writer = ShardWriter(
        directory, manifest, rows_per_shard=cfg.rows_per_shard, seed=cfg.seed, redo=redo
    )
    group_rows = dict.fromkeys((h.name for h in hookpoints), 0)
    batch_rows = dict.fromkeys(group_rows, 0)
    row_bytes = {h.name: 0 for h in hookpoints}
    progress = _Progress(
        len(indices), last.inputs_done if last else 0, cfg.progress and _dist.is_rank_zero()
    )

    def on_capture(hookpoint: Hookpoint, tensor: Tensor, context: ForwardContext) -> None:
        rows, values = _rows_of(adapter, cfg, storage_dtype, hookpoint, tensor, context)
        record = manifest.hookpoints.get(hookpoint.name)
        if record is None:
            with writer.lock:
                record = manifest.hookpoints[hookpoint.name] = HookpointRecord(
                    module=hookpoint.module,
                    capture=hookpoint.capture,
                    d=rows.d,
                    block_rows=block_rows_for(rows.d, storage_dtype),
                    description=adapter.describe(hookpoint.module),
                    sample_shape=list(tensor.shape[1:]),
                )
        elif rows.d != record.d:
            raise CacheError(
                f"hookpoint {hookpoint.name} produced rows of width {rows.d}, earlier {record.d}; "
                "a hookpoint's rows must all have one width"
            )
        n = len(rows)
        batch_rows[hookpoint.name] += n
        row_bytes[hookpoint.name] = values.element_size() * rows.d + METADATA_BYTES_PER_ROW
        progress.rows += n
        progress.bytes += n * values.element_size() * rows.d
        if n:
            writer.add(hookpoint.name, values, metadata_columns(rows))

    done_batches = start_batch
    inputs_done = last.inputs_done if last else 0
    pending = False  # batches consumed since the last group ended
    checked_space = False
    try:
        with ActivationCapture(
            adapter, hookpoints, on_capture, early_stop=cfg.early_stop
        ) as capture:
            for loaded in iter_batches(
                source, indices, cfg.batch_size, skips, start_batch=start_batch
            ):
                capture.run(loaded.batch)
                progress.update(loaded.inputs_done - inputs_done)
                done_batches, inputs_done, pending = loaded.index + 1, loaded.inputs_done, True
                if not checked_space:
                    _report_space(
                        cfg,
                        directory,
                        batch_rows,
                        row_bytes,
                        len(loaded.batch),
                        indices,
                        inputs_done,
                    )
                    checked_space = True
                    if is_new:
                        with writer.lock:
                            save_manifest(directory, manifest)
                for name, n in batch_rows.items():
                    group_rows[name] += n
                    batch_rows[name] = 0
                if max(group_rows.values()) >= cfg.shuffle_buffer_rows:
                    writer.end_group(
                        GroupRecord(group, done_batches, inputs_done, dict(skips.counts))
                    )
                    group += 1
                    group_rows = dict.fromkeys(group_rows, 0)
                    pending = False
        if progress.rows == 0 and manifest.rows == 0 and len(indices):
            why = (
                f"every input was skipped ({skips.summary()})"
                if skips.total
                else ("the row filter (rows.*) kept no row")
            )
            raise CacheError(f"no rows were cached: {why}")
        total_batches = -(-len(indices) // cfg.batch_size)
        if pending or done_batches < total_batches:
            writer.end_group(GroupRecord(group, total_batches, len(indices), dict(skips.counts)))
        writer.close()
    except BaseException:
        writer.abort()
        progress.close()
        raise
    progress.close()
    with writer.lock:
        manifest.complete = True
        save_manifest(directory, manifest)
    if skips.total:
        log.warning(
            "skipped %d inputs (%s); first: %s", skips.total, skips.summary(), skips.examples[0]
        )
    return _result(directory, manifest, writer.bytes_written, start_batch, time.perf_counter())


def _report_space(
    cfg: CacheConfig,
    directory: Path,
    batch_rows: dict[str, int],
    row_bytes: dict[str, int],
    batch_inputs: int,
    indices: range,
    inputs_done: int,
) -> None:
    """Estimate the bytes still to write from the first batch; refuse if they will not fit."""
    remaining = len(indices) - inputs_done + batch_inputs
    needed = sum(
        int(batch_rows[name] / max(batch_inputs, 1) * remaining * row_bytes[name])
        for name in batch_rows
    )
    rows = sum(int(batch_rows[n] / max(batch_inputs, 1) * remaining) for n in batch_rows)
    what = f"cache of {len(batch_rows)} hookpoint(s), ~{rows:,} rows"
    if cfg.disk_check:
        line = check_space(directory, needed, what=what)
    else:
        line = f"{what}: about {human_bytes(needed)} to write (disk check disabled)"
    if _dist.is_rank_zero():  # beside the progress bar, off stdout (which scripts may parse)
        print(f"saekit cache: {line}", file=sys.stderr, flush=True)


def _merge_if_last(root: Path) -> Path | None:
    """Merge the rank directories once all have finished (whichever rank finishes last does it;
    the merged manifest is deterministic, so two ranks finishing together write the same)."""
    try:
        merge_cache(root)
    except CacheError as err:
        log.info(
            "not merged yet (%s); `saekit cache merge %s` merges once all ranks finish", err, root
        )
        return None
    return root
