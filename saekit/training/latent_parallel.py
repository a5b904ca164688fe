"""Latent-split training: a dictionary too large for one device, its latents sliced over ranks.

Rank r holds latents ``[r·m/W, (r+1)·m/W)``: those rows of W_enc, b_enc, W_dec (and the JumpReLU
thresholds); b_dec is replicated. Every rank sees the same batch. Per step (N tokens, W ranks):

1. each rank computes its slice of the pre-activations and its local top-k: ``(N, k)`` values;
2. the candidates are all-gathered (``N·k·W`` values, a few MB) and every rank takes the global
   top-k of the ``W·k`` candidates per token; a rank keeps the winners that are its own;
3. each rank decodes its winners into a partial reconstruction, and one all-reduce of ``N x d``
   sums the partials.

Communication per step is therefore ``O(N·k·W + N·d)`` numbers, independent of m; compute and
memory per rank are ``1/W`` of the unsplit dictionary's. In the backward pass the gradient of the
encoder input is all-reduced (Megatron's "copy to parallel region"), which gives the replicated
b_dec its full gradient. JumpReLU and ReLU latents are elementwise, so they need only step 3.
BatchTopK's batch-wide threshold is not split (a ConfigError says so).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ..configuration import ConfigError
from ..dictionaries import SAEConfig, SparseAutoencoder, StepContext, TrainOutput, build_dictionary
from ..dictionaries.base import initial_decoder_rows, reconstruction_loss
from ..kernels import SparseCodes, jumprelu_encode, sparse_decode, topk_encode
from .distributed import ProcessGroup

LATENT_DIM_PARAMETERS = ("W_enc", "b_enc", "W_dec", "threshold")
"""Parameters with one row per latent: split over ranks. The others (b_dec) are replicated."""


class _CopyToParallel(torch.autograd.Function):
    """Identity forward; the gradient is summed over ranks (each rank saw only its latents)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        return ctx.group.all_reduce_sum(grad.contiguous().clone()), None


class _ReduceFromParallel(torch.autograd.Function):
    """Sum of the ranks' partial tensors forward; identity backward."""

    @staticmethod
    def forward(ctx: Any, partial: Tensor, group: ProcessGroup) -> Tensor:
        return group.all_reduce_sum(partial.clone())

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        return grad, None


def merge_topk(values: Tensor, k: int, group: ProcessGroup) -> Tensor:
    """Which of this rank's (N, k_local) candidates are in the global top-k of their row.

    Returns an (N, k_local) bool mask.
    """
    n, k_local = values.shape
    gathered = group.all_gather(values.contiguous())  # (W·N, k_local), rank-major
    per_token = (
        gathered.view(group.world_size, n, k_local).permute(1, 0, 2).reshape(n, -1)
    )  # (N, W·k_local)
    winners = per_token.topk(min(k, per_token.shape[1]), dim=1).indices
    keep = torch.zeros_like(per_token, dtype=torch.bool).scatter_(1, winners, True)
    return keep.view(n, group.world_size, k_local)[:, group.rank]


class LatentShard(nn.Module):
    """This rank's slice of a dictionary's latents, trained as part of the whole."""

    def __init__(
        self, cfg: SAEConfig, group: ProcessGroup, device: torch.device | str | None = None
    ):
        super().__init__()
        if cfg.architecture == "batchtopk":
            raise ConfigError(
                "--parallel latents supports topk, jumprelu and relu; batchtopk's batch-wide selection is not split"
            )
        if cfg.d_sae % group.world_size:
            raise ConfigError(
                f"--parallel latents needs d_sae={cfg.d_sae} to be divisible by the world size {group.world_size}"
            )
        self.cfg = cfg
        self.group = group
        width = cfg.d_sae // group.world_size
        self.start, self.stop = group.rank * width, (group.rank + 1) * width
        local_cfg = dataclasses.replace(cfg, d_sae=width, k=min(cfg.k, width))
        self.local = build_dictionary(local_cfg, device=device)
        rows = initial_decoder_rows(cfg, self.start, self.stop).to(device)
        with torch.no_grad():  # the same initial weights as the unsplit dictionary's slice
            self.local.W_dec.copy_(rows)
            self.local.W_enc.copy_(rows)

    # The trainer talks to a shard as to a dictionary: same parameter names, same state_dict keys.
    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.local.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        return self.local.load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    @property
    def normalize_decoder(self) -> bool:
        return self.local.normalize_decoder

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.local.d_sae

    @property
    def b_dec(self) -> nn.Parameter:
        return self.local.b_dec

    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        self.local.remove_gradient_parallel_to_decoder_directions()

    def after_optimizer_step(self) -> None:
        self.local.after_optimizer_step()

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip by the norm of the whole (unsplit) gradient: split parts summed over ranks,
        the replicated b_dec counted once. Returns that norm (0-d, on the device)."""
        split = [
            p.grad
            for n, p in self.local.named_parameters()
            if n in LATENT_DIM_PARAMETERS and p.grad is not None
        ]
        squares = torch.stack([g.float().pow(2).sum() for g in split]).sum()
        total = self.group.all_reduce_sum(squares.clone())
        if self.local.b_dec.grad is not None:
            total = total + self.local.b_dec.grad.float().pow(2).sum()
        coefficient = (max_norm / (total.sqrt() + 1e-6)).clamp(max=1.0)
        for p in self.local.parameters():
            if p.grad is not None:
                p.grad.mul_(coefficient)
        return total.sqrt()

    def training_forward(self, x: Tensor, ctx: StepContext) -> TrainOutput:
        local, group = self.local, self.group
        n = x.shape[0]
        x_c = _CopyToParallel.apply(x - local.b_dec, group)  # (N, d)
        terms: dict[str, Tensor] = {}
        if self.architecture == "topk":
            dead_total = (
                ctx.dead_total if ctx.dead_total is not None else self._count(ctx.dead_latents)
            )
            k_aux = min(ctx.k_aux, dead_total) if ctx.auxk_alpha > 0 else 0
            dead = ctx.dead_latents if k_aux else None
            codes, aux = topk_encode(x_c, local.W_enc, local.b_enc, local.cfg.k, dead, k_aux)
            codes = self._keep_global_winners(codes, self.cfg.k)
            partial = sparse_decode(codes, local.W_dec)
        elif self.architecture == "jumprelu":
            codes, l0_local = jumprelu_encode(
                x_c, local.W_enc, local.b_enc, local.threshold, ctx.jumprelu_bandwidth
            )
            partial = sparse_decode(codes, local.W_dec)
        else:  # relu
            z = torch.addmm(local.b_enc, x_c, local.W_enc.t()).relu()
            partial = z @ local.W_dec
            from ..dictionaries.relu import dense_to_codes

            codes = dense_to_codes(z.detach())
        recon = (
            _ReduceFromParallel.apply(partial, group) + local.b_dec
        )  # (N, d), same on every rank
        loss, terms = reconstruction_loss(x, recon)
        l0_local_count = (codes.values.detach() > 0).sum().to(x.dtype)
        terms["l0"] = group.all_reduce_sum(l0_local_count.clone()) / n
        if self.architecture == "topk" and k_aux:
            aux_codes = self._keep_global_winners(_pad_aux(aux, n, k_aux, x, local.d_sae), k_aux)
            predicted = _ReduceFromParallel.apply(sparse_decode(aux_codes, local.W_dec), group)
            target = (x - recon).detach()
            auxk = (
                min(dead_total / max(ctx.k_aux, 1), 1.0) * reconstruction_loss(target, predicted)[0]
            )
            loss = loss + ctx.auxk_alpha * auxk
            terms["auxk"] = auxk.detach()
        elif self.architecture == "jumprelu":
            l0 = _ReduceFromParallel.apply(l0_local.reshape(1), group)[0] / n
            loss = loss + ctx.sparsity_coefficient * l0
            terms["l0_penalty"] = l0.detach()
        elif self.architecture == "relu":
            l1_local = (z * local.W_dec.norm(dim=1)).sum()
            l1 = _ReduceFromParallel.apply(l1_local.reshape(1), group)[0] / n
            loss = loss + ctx.sparsity_coefficient * l1
            terms["l1"] = l1.detach()
        return TrainOutput(loss, recon, codes, terms)

    def _count(self, dead_latents: Tensor | None) -> int:
        """Dead latents over every rank (a collective and a host read: the trainer passes the
        count it took when it last refreshed the dead latents, so a step does without)."""
        local = torch.full(
            (1,),
            0 if dead_latents is None else dead_latents.numel(),
            device=self.local.b_dec.device,
        )
        return int(self.group.all_reduce_sum(local).item())

    def _keep_global_winners(self, codes: SparseCodes, k: int) -> SparseCodes:
        assert codes.k is not None
        values = codes.values.view(codes.n_rows, codes.k)
        keep = merge_topk(values.detach(), k, self.group)
        kept = torch.where(keep, values, 0)  # losers carry neither value nor gradient
        return SparseCodes(kept.reshape(-1), codes.indices, codes.offsets, codes.d_sae, codes.k)

    # ------------------------------------------------------------------ whole-dictionary views

    def gather_state(
        self, tensors: dict[str, Tensor], names_with_latent_dim: set[str]
    ) -> dict[str, Tensor]:
        """Concatenate the ranks' slices of the named latent-dimension tensors (all ranks call)."""
        return {
            name: self.group.all_gather(t) if name in names_with_latent_dim else t
            for name, t in tensors.items()
        }

    def slice_rows(self, tensor: Tensor) -> Tensor:
        return tensor[self.start : self.stop]

    def full_dictionary(self) -> SparseAutoencoder:
        """The unsplit dictionary, gathered from every rank (all ranks must call this)."""
        state = self.gather_state(
            {k: v.detach() for k, v in self.local.state_dict().items()}, set(LATENT_DIM_PARAMETERS)
        )
        full = build_dictionary(self.cfg, device=self.local.b_dec.device)
        full.load_state_dict(state)
        return full


def _pad_aux(aux: SparseCodes | None, n: int, k_aux: int, like: Tensor, d_sae: int) -> SparseCodes:
    """Local AuxK codes padded to (N, k_aux) with zeros, so every rank joins the same collective
    even when it holds fewer dead latents than k_aux (or none)."""
    width = 0 if aux is None else aux.k or 0
    values = like.new_zeros(n, k_aux)
    indices = torch.zeros(n, k_aux, dtype=torch.long, device=like.device)
    if aux is not None and width:
        values[:, :width] = aux.values.view(n, width)
        indices[:, :width] = aux.indices.view(n, width)
    return SparseCodes.from_topk(values, indices, d_sae)
