"""Typed configuration of a training run (drives ``saekit train``, its YAML files and run.json)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..configuration import ConfigError
from ..dictionaries import SAEConfig

# Fields that may change between a run and its resumption; anything else must match.
RESUMABLE_CHANGES = (
    "max_steps",
    "epochs",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "progress",
    "resume",
    "output_dir",
    "wandb_project",
    "run_name",
    "dist_timeout_s",
)


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of a training run."""

    batch_size: int = 4096
    """Tokens (rows) per optimisation step."""

    epochs: int = 1
    """Passes over the data (sources that have epochs)."""

    max_steps: int = 0
    """Stop after this many steps; 0 means when the data ends."""

    lr: float | None = None
    """Adam learning rate. None: 2e-4 / sqrt(d_sae / 2^14), the scaling of Gao et al. 2024."""

    lr_warmup_steps: int = 1000
    """Linear learning-rate warm-up from 0 over at most this many steps (and at most
    ``lr_warmup_fraction`` of the run)."""

    lr_warmup_fraction: float = 0.01
    """Cap of the warm-up as a fraction of the run's steps, when the run's length is known: a
    short run spends next to nothing warming up, a long one up to ``lr_warmup_steps``. Adam's
    bias correction already tempers its first steps, and every step spent below the full learning
    rate is a step that learns less."""

    lr_decay: Literal["none", "linear", "cosine"] = "linear"
    """Decay to 0 over the last part of training (needs a known number of steps)."""

    lr_decay_start: float = 0.8
    """Fraction of the steps after which the decay begins."""

    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's beta1 and beta2."""

    adam_eps: float = 6.25e-10
    """Adam's epsilon (Gao et al. 2024 use 6.25e-10)."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss on dead latents (Gao et al. 2024, appendix B.1); 0 disables it."""

    k_aux: int = 0
    """Dead latents per token in the AuxK reconstruction; 0 means d_in / 2."""

    dead_tokens: int = 1_000_000
    """A latent that has not fired for this many tokens counts as dead."""

    sparsity_coefficient: float | None = None
    """L0 penalty (jumprelu) or L1 penalty (relu) weight, against the FVU loss. None: 1e-2 for
    jumprelu, 3e-2 for relu."""

    sparsity_warmup_steps: int = 500
    """Steps over which the sparsity penalty ramps up linearly from 0."""

    jumprelu_bandwidth: float = 0.05
    """Width of the rectangle kernel of JumpReLU's straight-through estimator, in units of the
    normalised activations (mean norm sqrt(d_in))."""

    normalize_activations: bool = True
    """Scale inputs to mean norm sqrt(d_in) during training; the factor is folded into the saved
    weights."""

    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """How the decoder bias starts: from the first batch's geometric median, its mean, or zero."""

    latent_init: Literal["data", "random"] = "data"
    """How latents start: at the directions of rows of the first batch (centred on b_dec;
    latents beyond its rows start random), or at random unit directions. The encoder starts as
    the decoder's transpose either way, at row norm encoder_init_scale."""

    encoder_init_scale: float = 3**-0.5
    """Row norm of the initial encoder (decoder rows have norm 1). Adam moves every entry by about
    the learning rate per step whatever the weight's scale, so a smaller encoder turns toward its
    feature faster; 1/sqrt(3) is the row norm of a default nn.Linear (Kaiming-uniform), where
    EleutherAI sparsify starts. From random latents on set a of scripts/bench_train.py, unit rows
    (Gao et al.'s choice) explained 0.257 of the held-out variance after 256 steps and 1/sqrt(3)
    0.268 (README, "What the training defaults are made of")."""

    data_seed: int = 0
    """Seed of the data order."""

    device: str = "auto"
    """cpu, cuda, cuda:1, ... or auto (cuda when available)."""

    autocast: bool = True
    """Run the forward pass in bfloat16 autocast on CUDA (master weights stay float32)."""

    nan_policy: Literal["skip", "stop"] = "skip"
    """On a batch with NaN/inf activations (or a non-finite loss): skip it and count it, or stop."""

    max_skipped_batches: int = 100
    """Stop when more batches than this were skipped."""

    log_every: int = 50
    """Steps between metric records (metrics.jsonl, wandb)."""

    checkpoint_every: int = 500
    """Steps between checkpoints; 0 disables checkpoints."""

    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""

    progress: bool = True
    """Show a progress bar (rank 0 only)."""

    parallel: Literal["data", "dictionaries", "latents"] = "data"
    """Under torchrun (WORLD_SIZE > 1): data = one dictionary, each rank a slice of every batch;
    dictionaries = the sweep's dictionaries dealt to the ranks; latents = each rank holds a slice
    of one dictionary's latents."""

    dist_timeout_s: float = 600.0
    """How long a rank waits for a silent peer before the run stops."""

    def __post_init__(self) -> None:
        positive = {
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "log_every": self.log_every,
        }
        for name, count in positive.items():
            if count < 1:
                raise ConfigError(f"{name} must be at least 1, got {count}")
        nonnegative: dict[str, float] = {
            "max_steps": self.max_steps,
            "lr_warmup_steps": self.lr_warmup_steps,
            "k_aux": self.k_aux,
            "dead_tokens": self.dead_tokens,
            "sparsity_warmup_steps": self.sparsity_warmup_steps,
            "checkpoint_every": self.checkpoint_every,
            "grad_clip": self.grad_clip,
            "auxk_alpha": self.auxk_alpha,
            "max_skipped_batches": self.max_skipped_batches,
        }
        for name, value in nonnegative.items():
            if value < 0:
                raise ConfigError(f"{name} must not be negative, got {value}")
        if self.lr is not None and not (0 < self.lr < 1):
            raise ConfigError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.lr_warmup_fraction <= 1:
            raise ConfigError(
                f"lr_warmup_fraction is a fraction of training in [0, 1], got {self.lr_warmup_fraction}"
            )
        if not 0 <= self.lr_decay_start <= 1:
            raise ConfigError(
                f"lr_decay_start is a fraction of training in [0, 1], got {self.lr_decay_start}"
            )
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"adam_betas must lie in [0, 1), got {self.adam_betas}")
        if self.encoder_init_scale <= 0:
            raise ConfigError(f"encoder_init_scale must be positive, got {self.encoder_init_scale}")
        if self.jumprelu_bandwidth <= 0:
            raise ConfigError(f"jumprelu_bandwidth must be positive, got {self.jumprelu_bandwidth}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be at least 1, got {self.keep_checkpoints}")

    def warmup_steps(self, total_steps: int | None) -> int:
        """Steps of the linear warm-up in a run of ``total_steps`` (None: length unknown)."""
        if total_steps is None:
            return self.lr_warmup_steps
        return min(self.lr_warmup_steps, math.ceil(self.lr_warmup_fraction * total_steps))

    def learning_rate(self, d_sae: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(d_sae / 2**14)

    def sparsity_weight(self, architecture: str) -> float:
        if self.sparsity_coefficient is not None:
            return self.sparsity_coefficient
        return {"jumprelu": 1e-2, "relu": 3e-2}.get(architecture, 0.0)


@dataclass
class DataConfig:
    """Where the activations come from."""

    activations: str | None = None
    """A .npy or .safetensors file of (rows, d) activations."""

    cache: str | None = None
    """An activation cache directory written by `saekit cache` (choose its hookpoint with
    --hookpoint when it holds several)."""

    tensor_key: str | None = None
    """The tensor to read from a .safetensors file holding several."""

    shuffle: bool = True
    """Shuffle rows each epoch."""

    def __post_init__(self) -> None:
        if self.activations and self.cache:
            raise ConfigError("give either --activations FILE or --cache DIR, not both")


@dataclass
class RunConfig:
    """Everything ``saekit train`` needs: what to train, on what, how, and where to write it."""

    sae: SAEConfig = field(default_factory=SAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    output_dir: str = "runs/sae"
    """Folder for the dictionaries, metrics.jsonl, run.json and checkpoints."""

    sweep: dict[str, list] = field(default_factory=dict)
    """Train several dictionaries in one pass over the data: SAEConfig field -> values, e.g.
    {k: [16, 32], seed: [0, 1]} trains the 4 combinations."""

    resume: bool = False
    """Continue from the latest checkpoint in output_dir."""

    wandb_project: str | None = None
    """Log to this Weights & Biases project as well (needs the wandb extra)."""

    run_name: str | None = None
    """Name of the run in wandb and in run.json."""

    def __post_init__(self) -> None:
        known = set(SAEConfig.__dataclass_fields__)
        for key, values in self.sweep.items():
            if key not in known:
                raise ConfigError(
                    f"sweep over unknown SAEConfig field {key!r}; known: {', '.join(sorted(known))}"
                )
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep.{key} must be a non-empty list of values")
