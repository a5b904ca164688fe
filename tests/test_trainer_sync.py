"""The trainer's step never waits for the device: host synchronisations counted per step on CPU.

On a GPU, reading a value back (``.item()``, ``bool(t)``, ``nonzero``, a boolean mask, a
``torch.tensor`` built from host data) drains the queue of launched kernels and idles the GPU
until the host refills it. No GPU is needed to see them: a ``TorchDispatchMode`` sees every
aten op a CPU step runs, and the ops that would synchronise on CUDA are known. This counts
them per step (from one batch handed to the trainer to the next): a non-logging step must run
none, outside the encoders that by their nature learn how many entries they produce
(JumpReLU's and BatchTopK's). What runs on the host alone (``.tolist()`` of a CPU tensor) makes
no aten op and is not seen here.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from saekit.dictionaries import SAEConfig
from saekit.kernels import eager
from saekit.training import TrainConfig, Trainer

aten = torch.ops.aten

# Ops that make a CUDA device synchronise with the host, whatever their arguments.
_ALWAYS = {
    aten._local_scalar_dense,  # .item(), bool(t), int(t), float(t)
    aten.is_nonzero,
    aten.nonzero,
    aten.masked_select,
    aten.equal,
    aten.bincount,  # reads the largest value to size its output
    aten.lift_fresh,  # torch.tensor(...) from host data: a host-to-device copy
    aten.lift_fresh_copy,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.unique_dim_consecutive,
}


def _syncs(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why ``func(*args, **kwargs)`` would synchronise on CUDA, or None."""
    packet = func.overloadpacket
    if packet in _ALWAYS:
        return str(packet)
    if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            return f"{packet} with a boolean mask"
    if packet is aten.repeat_interleave and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"  # sums the repeats to size its output
    if packet in (aten._to_copy, aten.copy_):
        tensors = [a for a in args[:2] if isinstance(a, torch.Tensor)]
        target = kwargs.get("device")
        devices = {t.device for t in tensors} | ({torch.device(target)} if target else set())
        if len(devices) > 1:
            return f"{packet} between devices"
    return None


class HostSyncs(TorchDispatchMode):
    """Records, per step, the ops that would synchronise a CUDA device with the host."""

    def __init__(self) -> None:
        super().__init__()
        self.step = -1
        self.inside: str | None = None
        self.by_step: dict[int, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.in_encoder: dict[int, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = _syncs(func, args, kwargs)
        if why is not None:
            where = self.in_encoder if self.inside else self.by_step
            where[self.step][why] += 1
        return func(*args, **kwargs)

    def source(self, batches: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """``batches``, each one starting a new step of the record."""
        for i, batch in enumerate(batches):
            self.step = i
            yield batch

    @contextlib.contextmanager
    def encoders(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        """Syncs inside the eager encoders whose output size depends on the data are recorded
        apart (``in_encoder``)."""
        for name in ("encode_jumprelu", "encode_batch_topk"):
            original = getattr(eager, name)

            def wrapped(*args: Any, _original: Any = original, _name: str = name, **kw: Any):
                self.inside = _name
                try:
                    return _original(*args, **kw)
                finally:
                    self.inside = None

            monkeypatch.setattr(eager, name, wrapped)
        yield


def _batches(n_batches: int, rows: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randn(n_batches * rows, d, generator=g).split(rows))


def _train(configs, batches, monkeypatch, **overrides) -> tuple[HostSyncs, Trainer]:
    train = TrainConfig(
        **{
            "batch_size": batches[0].shape[0],
            "lr_warmup_steps": 2,
            "sparsity_warmup_steps": 2,
            "log_every": 4,
            "checkpoint_every": 0,
            "progress": False,
            "device": "cpu",
            **overrides,
        }
    )
    # The kernels as a CUDA device runs them without Triton: the eager twins' dense blocks,
    # which read their bounds on the host, are a CPU-only path.
    monkeypatch.setattr(eager, "DENSE_DENSITY", float("inf"))
    recorder = HostSyncs()
    trainer = Trainer(configs, train, recorder.source(batches))
    with recorder.encoders(monkeypatch), recorder:
        trainer.fit()
    return recorder, trainer


def _quiet_steps(recorder: HostSyncs, n_steps: int, log_every: int) -> list[int]:
    """Steps that neither initialise the run (the first) nor end with a log record."""
    return [i for i in range(1, n_steps) if (i + 1) % log_every and i != n_steps - 1]


def test_a_topk_step_with_auxk_never_waits_for_the_device(monkeypatch):
    """TopK with AuxK on dead latents (most of the 256 die within two steps): no step but the
    logging ones reads anything back, the AuxK selection included."""
    batches = _batches(12, 64, 16)
    recorder, trainer = _train(
        [SAEConfig(architecture="topk", k=2, d_sae=256)], batches, monkeypatch, dead_tokens=64
    )
    for step in _quiet_steps(recorder, len(batches), 4):
        assert not recorder.by_step[step], f"step {step} synchronised: {recorder.by_step[step]}"
        assert not recorder.in_encoder[step]
    slot = trainer.slots[0]
    assert slot.dead is not None and slot.dead.numel() > 100, "AuxK must have had dead latents"
    assert "auxk" in slot.last_metrics
    # The detector sees the logging steps' reads (otherwise this test would prove nothing).
    assert recorder.by_step[3]["aten._local_scalar_dense"] > 0


def test_jumprelu_and_batchtopk_steps_wait_only_for_their_encoders(monkeypatch):
    """JumpReLU's and BatchTopK's encoders produce a data-dependent number of entries, which the
    host must learn (eager: ``nonzero`` per chunk; BatchTopK also checks that its candidates
    sufficed). Everything else of the step (the dictionaries' losses, BatchTopK's threshold, the
    trainer's bookkeeping, AuxK) stays on the device."""
    batches = _batches(10, 64, 16, seed=1)
    configs = [
        SAEConfig(architecture="jumprelu", d_sae=64),
        SAEConfig(architecture="batchtopk", k=3, d_sae=64),
    ]
    recorder, trainer = _train(configs, batches, monkeypatch, dead_tokens=64)
    for step in _quiet_steps(recorder, len(batches), 4):
        assert not recorder.by_step[step], f"step {step} synchronised: {recorder.by_step[step]}"
        # JumpReLU's: one `nonzero` per block of rows (one here). BatchTopK's: one check that the
        # candidates sufficed, and a `nonzero` and a check more when some row needed more.
        inside = recorder.in_encoder[step]
        assert set(inside) == {"aten.nonzero", "aten._local_scalar_dense"}, inside
        assert inside["aten.nonzero"] <= 3 and inside["aten._local_scalar_dense"] <= 3, inside
    assert trainer.slots[1].dead is not None, "BatchTopK's AuxK must have had dead latents"
    assert "auxk" in trainer.slots[1].last_metrics


def test_a_non_finite_batch_is_skipped_without_waiting(monkeypatch, caplog):
    """A NaN batch between two logging steps costs no synchronisation: the update is skipped on
    the device, and the next logging step reads the record and applies the policy."""
    batches = _batches(8, 64, 16, seed=2)
    batches[5] = batches[5].clone()
    batches[5][7, 3] = float("nan")
    recorder, trainer = _train(
        [SAEConfig(architecture="topk", k=2, d_sae=32)], batches, monkeypatch, dead_tokens=64
    )
    assert not recorder.by_step[5], recorder.by_step[5]
    assert trainer.skipped_batches == 1
    assert (
        "batch 5 holds NaN or infinite activations (1 of 64 rows, first at row 7 of the shuffled"
        in caplog.text
    )
    assert all(torch.isfinite(p).all() for p in trainer.slots[0].sae.parameters())
    # The skipped step neither counted its tokens nor moved the dead-latent counters.
    assert trainer.tokens == 7 * 64
    assert int(trainer.slots[0].tokens_since_fired.max()) <= 7 * 64
