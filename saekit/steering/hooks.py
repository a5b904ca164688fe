"""The steering transform at one hookpoint: encode, edit some latents in scope, add back only
the change.

For the rows ``x`` ``(N, d)`` of a hooked tensor and an intervention on features ``F``:

    v   = encode(x)[:, F]                      # (N, |F|) current latent values
    v'  = v + w * (edit(v) - v)                # w (N,): the scope's weight of each row
    x'  = x + (v' - v) @ W_dec[F]              # the SAE error x - x_hat stays in x'

Because the decoder is linear, ``decode(edited codes) - decode(codes)`` is exactly
``(v' - v) @ W_dec[F]``: this is :func:`saekit.evaluation.splice.splice` with ``error_term=True``
and an edit, computed on the edited columns only. An ``add`` needs no encoding at all. Where the
scope gives a row weight 0 the row is left as it was; a call where no intervention is in scope
returns None, which leaves the hooked tensor itself in place: a no-op steer is bitwise the clean
model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters.base import COND, UNCOND, Capture, ModelAdapter
from ..dictionaries import SparseAutoencoder
from ..evaluation.splice import (
    HookHandle,
    Layout,
    from_rows,
    hook_activation,
    resolve_layout,
    to_rows,
)
from ..kernels import SparseCodes
from .config import Intervention, Scope
from .context import IMAGE, TEXT, CallTracker


def feature_values(codes: SparseCodes, features: Tensor) -> Tensor:
    """Dense values ``(N, F)`` of the latents ``features`` ``(F,)`` in sparse ``codes``
    (0 where a latent is not among a row's active entries)."""
    out = torch.zeros(
        codes.n_rows, features.numel(), dtype=codes.values.dtype, device=codes.values.device
    )
    match = codes.indices.unsqueeze(1) == features.to(codes.indices.device).unsqueeze(0)  # (nnz, F)
    entry, column = match.nonzero(as_tuple=True)
    out[codes.rows()[entry], column] = codes.values[entry]
    return out


def _firing(codes: SparseCodes, features: Sequence[int]) -> Tensor:
    """``(nnz,)`` whether each active entry of ``codes`` is one of ``features``, firing."""
    wanted = torch.tensor(features, dtype=torch.long, device=codes.indices.device)
    return torch.isin(codes.indices, wanted) & (codes.values > 0)


def _rows_where_active(codes: SparseCodes, features: Sequence[int], n: int) -> Tensor:
    """``(N,)`` whether any of ``features`` fires (value > 0) on each row of ``codes``."""
    out = torch.zeros(n, dtype=torch.bool, device=codes.indices.device)
    out[codes.rows()[_firing(codes, features)]] = True
    return out


def _presence(codes: SparseCodes, features: Sequence[int], typical: Tensor, n: int) -> Tensor:
    """``(N,)`` how strongly ``features`` fire on each row, in units of their typical activation
    ``typical`` ``(d_sae,)``: the summed value of those that fire over their summed typical
    activation (1: they fire as on a typical row of their concept; 0: none fires). Only the
    latents that fire count: a TopK row holds few of a concept's latents at once, and a row of
    one of several merged concepts should weigh as much as a row of a concept alone."""
    hit = _firing(codes, features)  # (nnz,)
    rows = codes.rows()[hit]
    value = torch.zeros(n, dtype=codes.values.dtype, device=codes.values.device)
    value.index_add_(0, rows, codes.values[hit])
    unit = torch.zeros_like(value)
    unit.index_add_(0, rows, typical.to(value)[codes.indices[hit]])
    return (value / unit.clamp_min(torch.finfo(value.dtype).tiny)).cpu()


def resize_mask(mask: Tensor, height: int, width: int) -> Tensor:
    """An ``(H, W)`` mask resized to a block's ``(height, width)`` grid: area averaging when
    shrinking (a cell's weight is the mask's mean over the pixels it covers), nearest when
    growing."""
    if tuple(mask.shape) == (height, width):
        return mask
    grid = mask[None, None].float()
    if height <= mask.shape[0] and width <= mask.shape[1]:
        out = F.adaptive_avg_pool2d(grid, (height, width))
    else:
        out = F.interpolate(grid, size=(height, width), mode="nearest")
    return out[0, 0]


def _square(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n else None


@dataclass
class _Applied:
    """What one intervention did (for the report)."""

    calls: int = 0
    """Calls of the hookpoint where it was in scope."""
    rows: int = 0
    """Rows it edited (weight != 0), summed over calls."""


@dataclass
class SteeringTransform:
    """The ``transform(activation) -> replacement | None`` of one hookpoint (for
    :func:`saekit.evaluation.splice.hook_activation`)."""

    sae: SparseAutoencoder
    interventions: Sequence[Intervention]
    hookpoint: str
    tracker: CallTracker | None = None
    typical: Tensor | None = None
    """``(d_sae,)`` each latent's typical activation (relative strengths)."""
    adapter: ModelAdapter | None = None
    layout: Layout = "auto"
    applied: list[_Applied] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.applied = [_Applied() for _ in self.interventions]
        for intervention in self.interventions:
            named = (*intervention.features, *(intervention.scope.weight_by or ()))
            bad = [f for f in named if not 0 <= f < self.sae.d_sae]
            if bad:
                raise ValueError(
                    f"features {bad} are not latents of the dictionary at {self.hookpoint!r} "
                    f"(d_sae={self.sae.d_sae})"
                )
            weight_by = intervention.scope.weight_by
            if weight_by is not None and (
                self.typical is None or not bool(self.typical[list(weight_by)].sum() > 0)
            ):
                raise ValueError(
                    f"Scope.weight_by at {self.hookpoint!r} needs the typical activation of "
                    f"latents {list(weight_by)}: pass typical= (a selection that holds them)"
                )
            if intervention.relative and self.typical is None:
                raise ValueError(
                    f"a relative strength at {self.hookpoint!r} needs each latent's typical "
                    "activation: pass typical= (a (d_sae,) tensor) or a selection file that "
                    "records it"
                )
        features = sorted({f for i in self.interventions for f in i.features})
        self.features = torch.tensor(features, dtype=torch.long)
        self.columns = [
            torch.tensor([features.index(f) for f in dict.fromkeys(i.features)], dtype=torch.long)
            for i in self.interventions
        ]

    # ------------------------------------------------------------------ call-level scope

    def _in_call(self, scope: Scope) -> bool:
        state = self.tracker.state if self.tracker is not None else None
        if scope.steps is not None:
            if state is None or state.step < 0:
                return False
            if not scope.steps[0] <= state.step < scope.steps[1]:
                return False
        if scope.phase != "all" and (state is None or state.phase != scope.phase):
            return False
        if scope.decode_steps is not None:
            if state is None or state.phase != "decode":
                return False
            if not scope.decode_steps[0] <= state.decode_step < scope.decode_steps[1]:
                return False
        return True

    # ------------------------------------------------------------------ row weights

    def _weights(self, scope: Scope, shape: tuple[int, ...], kind: str) -> Tensor | None:
        """``(B, P)`` float weight of every row of the hooked tensor, or None for all ones."""
        b = shape[0]
        if kind == "channels_first":
            grid: tuple[int, int] | None = (shape[2], shape[3]) if len(shape) == 4 else None
            p = int(torch.Size(shape[2:]).numel())
        else:
            p = int(torch.Size(shape[1:-1]).numel())
            grid = (shape[1], shape[2]) if len(shape) == 4 else None
        w: Tensor | None = None

        def weights() -> Tensor:
            nonlocal w
            if w is None:
                w = torch.ones(b, p)
            return w

        state = self.tracker.state if self.tracker is not None else None
        if scope.branch != "both":
            branch = state.branch if state is not None else None
            if branch is None or branch.numel() != b:
                branch = torch.full((b,), COND, dtype=torch.int8)  # unguided: all conditional
            sign = {
                "cond": (branch == COND).float(),
                "uncond": (branch == UNCOND).float(),
                "cond_minus_uncond": (branch == COND).float() - (branch == UNCOND).float(),
            }[scope.branch]
            weights().mul_(sign[:, None])
        if scope.tokens != "all":
            want = IMAGE if scope.tokens == "image" else TEXT
            kinds = None
            if self.tracker is not None:
                kinds = self.tracker.token_kinds(self.hookpoint, b, p)
                if kinds is None:
                    uniform = self.tracker.uniform_kind(self.hookpoint, p)
                    if uniform is None:
                        raise ValueError(
                            f"cannot tell image from text tokens at {self.hookpoint!r} in this "
                            "call; drop Scope.tokens or hook a module whose tokens are known"
                        )
                    kinds = torch.full((b, p), uniform, dtype=torch.int8)
            else:
                raise ValueError("Scope.tokens needs a model whose adapter knows token streams")
            weights().mul_((kinds == want).float())
        if scope.positions is not None:
            offset = state.offset if state is not None else 0
            index = torch.arange(p) + offset
            keep = torch.isin(index, torch.tensor(scope.positions, dtype=torch.long))
            weights().mul_(keep.float()[None, :])
        if scope.mask is not None:
            weights().mul_(self._mask_weights(scope.mask, p, grid)[None, :])
        return w

    def _mask_weights(self, mask: Tensor, p: int, grid: tuple[int, int] | None) -> Tensor:
        """``(P,)`` weights of a spatial mask over a hooked tensor's ``P`` positions."""
        if grid is None:
            side = _square(p)
            if side is not None:
                grid = (side, side)
            elif p > 1 and _square(p - 1) is not None:  # a ViT: CLS first, then the patches
                side = _square(p - 1) or 0
                patches = resize_mask(mask, side, side).reshape(-1)
                return torch.cat([torch.zeros(1), patches])
            else:
                raise ValueError(
                    f"Scope.mask needs a spatial tensor; {self.hookpoint!r} has {p} positions, "
                    "which is not a square grid"
                )
        return resize_mask(mask, *grid).reshape(-1)

    # ------------------------------------------------------------------ the transform

    def __call__(self, activation: Tensor) -> Tensor | None:
        active = [i for i, iv in enumerate(self.interventions) if self._in_call(iv.scope)]
        if not active:
            return None
        kind = resolve_layout(
            tuple(activation.shape),
            self.sae.d_in,
            self.layout,
            adapter=self.adapter,
            hookpoint=self.hookpoint,
        )
        shape = tuple(activation.shape)
        row_weights: dict[int, Tensor | None] = {}
        for i in active:
            w = self._weights(self.interventions[i].scope, shape, kind)
            if w is not None and not bool(w.any()):
                continue  # in this call, but no row of it in scope
            row_weights[i] = w
        keep_error = all(self.interventions[i].keep_error for i in active)
        if not row_weights and keep_error:
            return None
        rows = to_rows(activation, kind).to(device=self.sae.device, dtype=self.sae.dtype)  # (N, d)
        n = rows.shape[0]
        device, dtype = self.sae.device, self.sae.dtype
        needs_codes = not keep_error or any(self.interventions[i].needs_codes for i in row_weights)
        codes = self.sae.encode(rows) if needs_codes else None
        for i, w in list(row_weights.items()):
            scope = self.interventions[i].scope
            if scope.where_active is None and scope.weight_by is None:
                continue
            assert codes is not None
            gated = torch.ones(n) if w is None else w.reshape(-1).clone()  # (N,)
            if scope.where_active is not None:
                gated *= _rows_where_active(codes, scope.where_active, n).float().cpu()
            if scope.weight_by is not None:
                assert self.typical is not None
                gated *= _presence(codes, scope.weight_by, self.typical, n)
            if not bool(gated.any()):
                del row_weights[i]
                continue
            row_weights[i] = gated
        if not row_weights and keep_error:
            return None
        if codes is not None:
            original = feature_values(codes, self.features.to(device))  # (N, F)
        else:
            original = torch.zeros(n, self.features.numel(), device=device, dtype=dtype)
        values = original.clone()
        for i, w in row_weights.items():
            intervention, columns = self.interventions[i], self.columns[i].to(device)
            v = values[:, columns]  # (N, f)
            edited = self._edit(intervention, v, columns)
            if w is None:
                values[:, columns] = edited
            else:
                weight = w.reshape(-1, 1).to(device=device, dtype=dtype)  # (N, 1)
                values[:, columns] = v + weight * (edited - v)
            self.applied[i].calls += 1
            self.applied[i].rows += n if w is None else int((w != 0).sum())
        w_dec = self.sae.W_dec[self.features.to(device)]  # (F, d)
        delta = (values - original) @ w_dec  # (N, d)
        if keep_error:
            return activation + from_rows(delta, activation, kind).to(activation)
        assert codes is not None
        recon = self.sae.decode(codes) + delta  # (N, d): the error is dropped
        return from_rows(recon, activation, kind).to(activation)

    def _edit(self, intervention: Intervention, v: Tensor, columns: Tensor) -> Tensor:
        """The edited values ``(N, f)`` of the intervention's features."""
        unit = torch.ones(columns.numel(), device=v.device, dtype=v.dtype)
        if intervention.relative:
            assert self.typical is not None
            unit = self.typical.to(device=v.device, dtype=v.dtype)[self.features.to(v.device)][
                columns
            ]
        kind = intervention.kind
        if kind == "add":
            return v + intervention.strength * unit
        if kind == "set":
            return (intervention.strength * unit).expand_as(v)
        if kind == "scale":
            return v * intervention.strength
        if kind == "ablate":
            return torch.zeros_like(v)
        low = None if intervention.low is None else intervention.low * unit
        high = None if intervention.high is None else intervention.high * unit
        out = v
        if low is not None:
            out = torch.maximum(out, low.expand_as(v))
        if high is not None:
            out = torch.minimum(out, high.expand_as(v))
        return out


def add_vector(
    model: nn.Module | ModelAdapter,
    hookpoint: str,
    capture: Capture,
    direction: Tensor,
    strength: float,
    *,
    layout: Layout = "auto",
) -> HookHandle:
    """Add ``strength * direction`` ``(d,)`` to the activation at ``hookpoint`` at every position
    of every call: the ``add`` primitive without a dictionary or a scope (a raw direction, e.g. a
    decoder row given alone). Strength 0 leaves the model bit for bit."""
    adapter = model if isinstance(model, ModelAdapter) else None

    def transform(activation: Tensor) -> Tensor | None:
        if strength == 0:
            return None
        kind = resolve_layout(
            tuple(activation.shape), direction.numel(), layout, adapter=adapter, hookpoint=hookpoint
        )
        shape = [1] * activation.ndim
        shape[1 if kind == "channels_first" else -1] = direction.numel()
        return activation + (strength * direction).to(activation).view(shape)

    return hook_activation(model, hookpoint, capture, transform)
