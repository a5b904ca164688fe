"""The small base that every dictionary shares: parameters, encode/decode, training hooks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from ..kernels import SparseCodes, sparse_decode
from .config import SAEConfig


class Reducer:
    """Sums or minimises a tensor over the processes that share one batch.

    A single process is its own reducer (identity). In data-parallel training every rank holds
    a slice of the batch, and the trainer passes a reducer over the ranks so that batch
    statistics (mean, variance, row count) are those of the whole batch.
    """

    def sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def min(self, tensor: Tensor) -> Tensor:
        return tensor


@dataclass
class StepContext:
    """What the trainer tells a dictionary about the current step."""

    dead_latents: Tensor | None = None
    """(n_dead,) int64 ids of latents that have not fired for a long time (AuxK)."""
    dead_total: int | None = None
    """Dead latents of the whole dictionary when ``dead_latents`` holds one latent-split rank's
    share; None means ``dead_latents.numel()`` (a host integer: no device read per step)."""
    k_aux: int = 0
    """Dead latents each token may use in the AuxK reconstruction of the residual."""
    auxk_alpha: float = 0.0
    """Weight of the AuxK loss."""
    sparsity_coefficient: float = 0.0
    """Weight of the L0 (jumprelu) or L1 (relu) penalty at this step, after warm-up."""
    jumprelu_bandwidth: float = 0.001
    """Width of the rectangle kernel of JumpReLU's straight-through estimator."""
    reduce: Reducer = field(default_factory=Reducer)
    """Reduces batch statistics over the processes that share the batch (data parallelism)."""

    def batch_rows(self, x: Tensor) -> Tensor:
        """Rows in the whole batch (over every process sharing it), as a 0-d tensor."""
        # torch.full fills on the device; torch.tensor would copy from the host (a sync on CUDA).
        return self.reduce.sum(torch.full((), float(x.shape[0]), device=x.device, dtype=x.dtype))


class TrainOutput(NamedTuple):
    """One training forward pass."""

    loss: Tensor
    """Scalar to minimise."""
    recon: Tensor
    """(N, d_in) reconstruction."""
    codes: SparseCodes
    """The latent activations (always sparse; relu converts its dense output)."""
    terms: dict[str, Tensor]
    """Detached scalar parts of the loss, for logging (fvu, auxk, sparsity, ...)."""


def fvu(x: Tensor, recon: Tensor, reduce: Reducer | None = None) -> Tensor:
    """Fraction of variance unexplained: ``|x - recon|^2 / |x - mean(x)|^2`` over the batch."""
    return reconstruction_loss(x, recon, reduce)[0]


def reconstruction_loss(
    x: Tensor, recon: Tensor, reduce: Reducer | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """FVU (the training loss: scale-free, so hyper-parameters transfer across layers) and the
    detached terms to log: fvu and mse (per element), all over the whole batch.

    With a data-parallel ``reduce``, this process's loss is its share ``SSE_rank / total``: the
    sum over ranks of these losses (and of their gradients) is the whole batch's FVU.
    """
    reduce = reduce or Reducer()
    rows = reduce.sum(torch.full((), float(x.shape[0]), device=x.device, dtype=x.dtype))
    mean = reduce.sum(x.detach().sum(0)) / rows  # (d,)
    total = reduce.sum((x.detach() - mean).pow(2).sum())
    sse = (x - recon).pow(2).sum()
    loss = sse / total.clamp_min(torch.finfo(x.dtype).tiny)
    sse_all = reduce.sum(sse.detach().clone())
    return loss, {"fvu": sse_all / total, "mse": sse_all / (rows * x.shape[1])}


class SparseAutoencoder(nn.Module):
    """``x -> codes = act(W_enc (x - b_dec) + b_enc) -> W_dec^T codes + b_dec``.

    Weights are stored one row per latent: ``W_enc`` (d_sae, d_in) and ``W_dec`` (d_sae, d_in),
    so that the sparse kernels gather and scatter contiguous rows.
    """

    architecture: ClassVar[str]
    normalize_decoder: ClassVar[bool] = True
    """Keep decoder rows at unit norm during training (TopK-style dictionaries)."""

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not cfg.d_in or not cfg.d_sae:
            raise ValueError(
                "SAEConfig must be resolved (d_in and d_sae set) before building a dictionary"
            )
        self.cfg = cfg
        m = cfg.d_sae
        # Decoder rows are random unit vectors; the encoder starts as the decoder's transpose
        # (Gao et al. 2024, section 2.4), which makes latents roughly orthogonal detectors. The
        # trainer rescales the encoder and starts latents on data rows (TrainConfig.latent_init).
        if device is not None and torch.device(device).type == "meta":
            w = torch.empty(m, cfg.d_in, device="meta")  # shapes only: weights are loaded next
        else:
            w = initial_decoder_rows(cfg, 0, m)
        self.W_dec = nn.Parameter(w.to(device))
        self.W_enc = nn.Parameter(w.clone().to(device))
        self.b_enc = nn.Parameter(torch.zeros(m, device=device))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device))

    # ------------------------------------------------------------------ shapes and dtypes

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    def _rows(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"expected inputs with last dimension d_in={self.d_in}, got shape {tuple(x.shape)}"
            )
        return x.reshape(-1, self.d_in).to(self.dtype)

    # ------------------------------------------------------------------ inference

    def encode(self, x: Tensor) -> SparseCodes:
        """Sparse latent activations of ``x`` (..., d_in), one CSR row per input row."""
        x = self._rows(x)
        return self._encode(x - self.b_dec)

    def _encode(self, x_c: Tensor) -> SparseCodes:
        raise NotImplementedError

    def decode(self, codes: SparseCodes) -> Tensor:
        """(N, d_in) reconstruction from sparse codes."""
        return sparse_decode(codes, self.W_dec) + self.b_dec

    def encode_dense(self, x: Tensor) -> Tensor:
        """Latent activations of ``x`` (..., d_in) as a dense (..., d_sae) tensor."""
        return self.encode(x).to_dense().view(*x.shape[:-1], self.d_sae)

    def decode_dense(self, z: Tensor) -> Tensor:
        """(..., d_in) reconstruction from dense latents (..., d_sae)."""
        return z.to(self.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of ``x``, with the same shape and dtype."""
        recon = self.decode(self.encode(x))
        return recon.view(x.shape).to(x.dtype)

    # ------------------------------------------------------------------ training

    def training_forward(self, x: Tensor, ctx: StepContext) -> TrainOutput:
        """The loss on a batch ``x`` (N, d_in) of (normalised) activations."""
        raise NotImplementedError

    def _auxk_loss(
        self, residual: Tensor, aux: SparseCodes | None, ctx: StepContext
    ) -> Tensor | None:
        """AuxK (Gao et al. 2024, appendix B.1): dead latents reconstruct the residual error.

        The residual is the target (detached); the gradient reaches W_dec through the decode and
        W_enc/b_enc through the aux codes. Scaled down while only a few latents are dead, so a
        handful of dead latents is not asked to carry the whole error.
        """
        if aux is None or ctx.dead_latents is None or ctx.auxk_alpha == 0:
            return None
        target = residual.detach()
        predicted = sparse_decode(aux, self.W_dec)
        scale = min(ctx.dead_latents.numel() / max(ctx.k_aux, 1), 1.0)
        return scale * fvu(target, predicted, ctx.reduce)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.dtype).eps))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out of each decoder row's gradient its component along the row: with unit-norm
        rows, that component only changes the norm, which the renormalisation undoes anyway."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make the dictionary act on raw inputs after training on ``scale * x``.

        With x' = s x: pre = (s x - b_dec) W_enc^T + b_enc = (x - b_dec / s)(s W_enc)^T + b_enc,
        and the raw reconstruction is (z W_dec + b_dec) / s. Latent values are unchanged.
        """
        if scale == 1.0:
            return
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)
        self.cfg.input_scale = (self.cfg.input_scale or 1.0) * scale

    def after_optimizer_step(self) -> None:
        """Restore constraints after an optimiser step (unit-norm decoder rows by default)."""
        if self.normalize_decoder:
            self.set_decoder_norm_to_unit_norm()

    def for_inference(self) -> SparseAutoencoder:
        """The dictionary to save and use after training (BatchTopK turns into JumpReLU)."""
        return self

    def extra_tensors(self) -> dict[str, Tensor]:
        """Tensors besides the four weights that the saved file holds (e.g. thresholds)."""
        return {}

    def load_extra_tensors(self, tensors: dict[str, Tensor]) -> None:
        if tensors:
            raise ValueError(f"unexpected tensors for {self.architecture}: {sorted(tensors)}")


INIT_BLOCK_ROWS = 4096
_INIT_SALT = 0x5AE_1417


def initial_decoder_rows(cfg: SAEConfig, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of the initial decoder: random unit vectors (stop - start, d_in).

    Drawn in blocks of ``INIT_BLOCK_ROWS`` rows, each from its own seeded generator, so any slice
    (a rank's latents in latent-split training) is reproduced exactly without drawing the rest.
    """
    blocks = []
    for block in range(start // INIT_BLOCK_ROWS, -(-stop // INIT_BLOCK_ROWS)):
        first = block * INIT_BLOCK_ROWS
        rows = min(INIT_BLOCK_ROWS, cfg.d_sae - first)
        # Salted so that seed 0 does not replay the stream of torch.Generator().manual_seed(0),
        # which synthetic data built with that seed would share.
        generator = torch.Generator().manual_seed(_INIT_SALT + cfg.seed * 1_000_003 + block)
        w = torch.randn(rows, cfg.d_in, generator=generator)
        blocks.append(w[max(start - first, 0) : stop - first])
    w = torch.cat(blocks)
    return w / w.norm(dim=1, keepdim=True)


def expected_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors in a saved dictionary of this config."""
    shapes: dict[str, tuple[int, ...]] = {
        "W_enc": (cfg.d_sae, cfg.d_in),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    if cfg.architecture == "jumprelu":
        shapes["threshold"] = (cfg.d_sae,)
    return shapes


def default_k_aux(d_in: int) -> int:
    """Gao et al. use k_aux = 512 for d_model = 768-ish; we take d_in / 2 like EleutherAI sparsify."""
    return max(1, math.ceil(d_in / 2))
