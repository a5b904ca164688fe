"""What splicing a dictionary into its model costs downstream, for each model family.

Every measurement runs the same inputs under several **conditions** (:data:`CONDITIONS`): the
clean model, the model with the dictionary spliced in (its reconstruction replaces the
activation), the same with the SAE error term added back (which must equal the clean model: a
check that the hooks sit where the dictionary was trained), and, for language models, the
hookpoint zero-ablated (the baseline of "loss recovered").

* **Contrastive VLMs** (CLIP): zero-shot accuracy and image/text retrieval recall@k, and the KL
  between the clean and spliced zero-shot distributions computed from temperature-scaled logits
  (``logit_scale.exp() * cosine``, the probabilities CLIP was trained to produce).
* **Language models and generative VLMs**: next-token cross-entropy; loss recovered
  ``(CE_zero - CE_spliced) / (CE_zero - CE_clean)`` (Gao et al. 2024, section 4.1; 1 is the clean
  model, 0 no better than deleting the activation); KL(clean || spliced) per token.
* **Text-to-image diffusion**: the same prompts and seeds with and without the dictionary; the
  pixel RMSE of each spliced sample to its clean twin, and, when the prompts' scenes and an oracle
  are given (the testbed), the oracle's factor accuracy of both.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters.base import Capture, ModelAdapter, first_tensor
from ..dictionaries import SparseAutoencoder
from .metrics import ReconstructionAccumulator, ReconstructionMetrics
from .splice import Layout, Observer, ablate, splice

CONDITIONS = ("clean", "spliced", "spliced_with_error", "zero_ablated")
"""clean model; dictionary reconstruction in place of the activation; reconstruction plus the
SAE error (equals clean); zeros in place of the activation."""


@dataclass(frozen=True)
class SpliceSite:
    """Where and how the dictionary goes into the model (defaults from its config)."""

    model: nn.Module | ModelAdapter
    """The root module (or its adapter) whose ``named_modules()`` path is the hookpoint."""
    sae: SparseAutoencoder
    hookpoint: str | None = None
    """Module path; default ``sae.cfg.hookpoint``."""
    capture: Capture | None = None
    """output / input / update; default ``sae.cfg.capture``."""
    layout: Layout = "auto"

    @property
    def resolved_hookpoint(self) -> str:
        hookpoint = self.hookpoint if self.hookpoint is not None else self.sae.cfg.hookpoint
        if hookpoint is None:
            raise ValueError("the dictionary's config names no hookpoint; give one")
        return hookpoint

    @contextlib.contextmanager
    def condition(self, name: str, observer: Observer | None = None) -> Iterator[None]:
        """Run the body under condition ``name`` (one of :data:`CONDITIONS`); checks on exit
        that a modified condition reached the hookpoint. ``observer`` sees the rows,
        reconstructions and codes of a spliced condition."""
        if name not in CONDITIONS:
            raise ValueError(f"unknown condition {name!r}; choose from {', '.join(CONDITIONS)}")
        if name == "clean":
            yield
            return
        capture = self.capture or self.sae.cfg.capture
        if name == "zero_ablated":
            handle = ablate(self.model, self.resolved_hookpoint, capture, layout=self.layout)
        else:
            handle = splice(
                self.model,
                self.sae,
                hookpoint=self.resolved_hookpoint,
                capture=capture,
                error_term=name == "spliced_with_error",
                layout=self.layout,
                observer=observer,
            )
        with handle:
            yield
        if handle.calls == 0:
            raise RuntimeError(
                f"the model never ran through {self.resolved_hookpoint!r} under condition "
                f"{name!r}: the dictionary was not in the computation (wrong model or hookpoint?)"
            )


class _InModel:
    """Reconstruction metrics of the activations the model itself produced for the downstream
    inputs, observed under the error-term condition (the model then runs exactly as clean, so
    every call, every denoising step included, sees clean activations), else under the splice."""

    def __init__(self, site: SpliceSite, conditions: Sequence[str]) -> None:
        self.acc = ReconstructionAccumulator(site.sae.d_sae)
        self.where = "spliced_with_error" if "spliced_with_error" in conditions else "spliced"

    def observer(self, condition: str) -> Observer | None:
        return self.acc.update if condition == self.where else None

    def metrics(self) -> ReconstructionMetrics | None:
        return self.acc.metrics() if self.acc.rows else None


# ----------------------------------------------------------------------------- contrastive


class ContrastiveModel(Protocol):
    """What zero-shot and retrieval need from a CLIP-like model: saekit's contrastive adapters
    (``CLIPAdapter(model, tokenizer=...)``, ``OpenCLIPAdapter``) have this shape."""

    def encode_images(self, images: Any) -> Tensor:
        """Image embeddings ``(N, e)`` (normalised by the caller)."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """Text embeddings ``(T, e)`` (normalised by the caller)."""
        ...

    def logit_scale(self) -> float:
        """The learned inverse temperature: logits are ``logit_scale * cosine``."""
        ...


@dataclass
class ZeroShotTask:
    """Classify images by their most similar class prompt."""

    class_prompts: list[str]
    """One prompt per class ("a photo of a dog", ...)."""
    labels: Tensor
    """``(N,)`` int64: the true class of each image."""


@dataclass
class ContrastiveScores:
    """One condition's scores."""

    zero_shot_accuracy: dict[str, float]
    """Accuracy per zero-shot task."""
    zero_shot_kl: dict[str, float]
    """Mean KL(clean || this condition) of the temperature-scaled zero-shot distributions."""
    recall_image_to_text: dict[str, float]
    """``recall@k``: share of images whose caption ranks in the top k."""
    recall_text_to_image: dict[str, float]
    """``recall@k``: share of captions whose image ranks in the top k."""
    retrieval_kl: float
    """Mean KL(clean || this) of the temperature-scaled image-to-text distributions."""


@dataclass
class ContrastiveResult:
    """Zero-shot and retrieval under each condition, and the drop from clean to spliced."""

    images: int
    logit_scale: float
    """The inverse temperature the probabilities were computed with."""
    conditions: dict[str, ContrastiveScores]
    zero_shot_accuracy_drop: dict[str, float]
    """Clean minus spliced accuracy, per task."""
    recall_drop: dict[str, float]
    """Clean minus spliced recall (image-to-text and text-to-image, per k)."""
    in_model: ReconstructionMetrics | None = None
    """Reconstruction of the activations these inputs produced at the hookpoint."""


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


def _kl(clean_logits: Tensor, logits: Tensor) -> float:
    """Mean over rows of KL(softmax(clean) || softmax(logits))."""
    p_log = clean_logits.log_softmax(-1)
    q_log = logits.log_softmax(-1)
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


def _recall(similarity: Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Recall@k of matching row i with column i in a square similarity matrix (N, N)."""
    correct = similarity.diagonal()[:, None]  # (N, 1)
    rank = (similarity > correct).sum(1)  # (N,) how many beat the right answer
    return {f"recall@{k}": float((rank < k).float().mean()) for k in ks}


@torch.no_grad()
def evaluate_contrastive(
    clip: ContrastiveModel,
    site: SpliceSite,
    images: Any,
    *,
    zero_shot: Mapping[str, ZeroShotTask] | None = None,
    captions: Sequence[str] | None = None,
    ks: Sequence[int] = (1, 5),
    conditions: Sequence[str] = ("clean", "spliced", "spliced_with_error"),
) -> ContrastiveResult:
    """Zero-shot accuracy (per task) and retrieval recall of ``captions[i]`` <-> ``images[i]``,
    clean and with the dictionary spliced in (whichever tower holds its hookpoint)."""
    zero_shot = dict(zero_shot or {})
    if not zero_shot and captions is None:
        raise ValueError("give zero-shot tasks, captions for retrieval, or both")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images; pair them one to one")
    for name, task in zero_shot.items():
        if task.labels.shape != (len(images),):
            raise ValueError(f"zero-shot task {name!r}: labels must have shape ({len(images)},)")
    scale = clip.logit_scale()
    task_logits: dict[str, dict[str, Tensor]] = {}  # condition -> task -> (N, C)
    retrieval_logits: dict[str, Tensor] = {}  # condition -> (N images, N captions)
    in_model = _InModel(site, conditions)
    for condition in ("clean", *[c for c in conditions if c != "clean"]):
        with site.condition(condition, in_model.observer(condition)):
            image_emb = F.normalize(clip.encode_images(images).float(), dim=-1)  # (N, e)
            task_logits[condition] = {
                name: scale * image_emb @ _unit(clip.encode_texts(task.class_prompts)).T
                for name, task in zero_shot.items()
            }
            if captions is not None:
                retrieval_logits[condition] = (
                    scale * image_emb @ _unit(clip.encode_texts(captions)).T
                )

    scores: dict[str, ContrastiveScores] = {}
    for condition, found in task_logits.items():
        retrieval = retrieval_logits.get(condition)
        labels = {name: task.labels.to(image_emb.device) for name, task in zero_shot.items()}
        scores[condition] = ContrastiveScores(
            zero_shot_accuracy={
                name: float((logits.argmax(1) == labels[name]).float().mean())
                for name, logits in found.items()
            },
            zero_shot_kl={
                name: _kl(task_logits["clean"][name], logits) for name, logits in found.items()
            },
            recall_image_to_text={} if retrieval is None else _recall(retrieval, ks),
            recall_text_to_image={} if retrieval is None else _recall(retrieval.T, ks),
            retrieval_kl=math.nan
            if retrieval is None
            else _kl(retrieval_logits["clean"], retrieval),
        )
    drop_acc: dict[str, float] = {}
    drop_recall: dict[str, float] = {}
    if "spliced" in scores:
        base, spliced = scores["clean"], scores["spliced"]
        drop_acc = {
            n: base.zero_shot_accuracy[n] - spliced.zero_shot_accuracy[n] for n in zero_shot
        }
        for direction in ("image_to_text", "text_to_image"):
            before = getattr(base, f"recall_{direction}")
            after = getattr(spliced, f"recall_{direction}")
            drop_recall |= {f"{direction}.{k}": before[k] - after[k] for k in before}
    return ContrastiveResult(len(images), scale, scores, drop_acc, drop_recall, in_model.metrics())


# ----------------------------------------------------------------------------- next token


@dataclass
class NextTokenResult:
    """Next-token loss of a language model (or generative VLM) under each condition."""

    tokens: int
    """Predicted tokens the losses average over."""
    loss: dict[str, float]
    """Mean cross-entropy per condition (nats per token)."""
    kl: dict[str, float]
    """Mean KL(clean || condition) per token."""
    loss_recovered: float
    """``(CE_zero - CE_spliced) / (CE_zero - CE_clean)``: 1 = the clean model, 0 = no better
    than zero-ablating the activation."""
    in_model: ReconstructionMetrics | None = None
    """Reconstruction of the activations these inputs produced at the hookpoint."""


def _targets(
    batch: Mapping[str, Any], ignore_token_ids: Sequence[int]
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """(targets (B, T-1), mask (B, T-1) bool, model inputs) of a causal-LM batch."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "labels" in batch:
        labels = batch["labels"][:, 1:]
        mask = labels != -100
    else:
        labels = batch["input_ids"][:, 1:]
        mask = torch.ones_like(labels, dtype=torch.bool)
        if "attention_mask" in batch:
            mask &= batch["attention_mask"][:, 1:].bool()
    for token in ignore_token_ids:
        mask &= labels != token
    return labels.clamp_min(0), mask, inputs


def _logits(model: Callable[..., Any], inputs: Mapping[str, Any]) -> Tensor:
    out = model(**inputs)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = first_tensor(out)
    if logits is None or logits.ndim != 3:
        raise ValueError(
            "the model must return logits (B, T, vocab) (a tensor or an output with .logits)"
        )
    return logits


@torch.no_grad()
def evaluate_next_token(
    model: Callable[..., Any],
    site: SpliceSite,
    batches: Iterable[Mapping[str, Any]],
    *,
    ignore_token_ids: Sequence[int] = (),
    conditions: Sequence[str] = CONDITIONS,
) -> NextTokenResult:
    """Next-token loss, loss recovered and KL to the clean model over ``batches``.

    A batch is the model's keyword inputs (``input_ids``, ``attention_mask``, ``pixel_values``
    ...); the targets are ``labels`` when given (``-100`` ignored), else the next input ids where
    the attention mask is set. ``ignore_token_ids`` drops more targets (e.g. a VLM's image
    tokens). ``model(**batch)`` must return logits or an output with ``.logits``.
    """
    conditions = ["clean", *[c for c in conditions if c != "clean"]]
    loss_sum = dict.fromkeys(conditions, 0.0)
    kl_sum = dict.fromkeys(conditions, 0.0)
    tokens = 0
    in_model = _InModel(site, conditions)
    for batch in batches:
        targets, mask, inputs = _targets(batch, ignore_token_ids)
        if not mask.any():
            continue
        clean_log: Tensor | None = None
        for condition in conditions:
            with site.condition(condition, in_model.observer(condition)):
                logits = _logits(model, inputs)[:, :-1].float()  # (B, T-1, V)
            log_probs = logits.log_softmax(-1)[mask]  # (n, V)
            target = targets.to(logits.device)[mask]  # (n,)
            loss_sum[condition] += float(F.nll_loss(log_probs, target, reduction="sum"))
            if clean_log is None:
                clean_log = log_probs
            kl_sum[condition] += float((clean_log.exp() * (clean_log - log_probs)).sum(-1).sum())
        tokens += int(mask.sum())
    if tokens == 0:
        raise ValueError("no target tokens: every batch was empty or masked out")
    loss = {c: loss_sum[c] / tokens for c in conditions}
    recovered = math.nan
    if "zero_ablated" in loss and "spliced" in loss:
        gap = loss["zero_ablated"] - loss["clean"]
        recovered = (loss["zero_ablated"] - loss["spliced"]) / gap if gap != 0 else math.nan
    kl = {c: kl_sum[c] / tokens for c in conditions}
    return NextTokenResult(tokens, loss, kl, recovered, in_model.metrics())


def causal_lm_batches(
    tokenizer: Any, texts: Sequence[str], *, batch_size: int = 16, max_length: int = 128
) -> Iterator[dict[str, Tensor]]:
    """Tokenised batches of ``texts`` (padded, truncated) for :func:`evaluate_next_token`."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    for start in range(0, len(texts), batch_size):
        yield dict(
            tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )


# ----------------------------------------------------------------------------- diffusion

Generate = Callable[[Sequence[str], Sequence[int]], Tensor]
"""``generate(prompts, seeds) -> images (B, 3, H, W)`` in [0, 1]; the same seed must give the
same starting noise."""


@dataclass
class DiffusionResult:
    """Samples of a text-to-image model with the dictionary spliced into its denoiser."""

    images: int
    pixel_rmse: dict[str, float]
    """Per condition: the mean over samples of the RMSE (pixels in [0, 1]) to the clean sample
    with the same prompt and seed."""
    oracle_accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per condition: the oracle's accuracy per factor against the prompts' scenes (testbed)."""
    in_model: ReconstructionMetrics | None = None
    """Reconstruction of the activations at the hookpoint over every denoising step."""


def pipeline_generator(
    pipe: Any, *, num_inference_steps: int = 20, guidance_scale: float | None = None
) -> Generate:
    """A :data:`Generate` for a diffusers-style pipeline (``pipe(prompts, generator=...,
    output_type="pt")``); one generator per prompt, seeded."""

    def generate(prompts: Sequence[str], seeds: Sequence[int]) -> Tensor:
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        kwargs: dict[str, Any] = {"num_inference_steps": num_inference_steps}
        if guidance_scale is not None:
            kwargs["guidance_scale"] = guidance_scale
        out = pipe(list(prompts), generator=generators, output_type="pt", **kwargs)
        images = out.images if hasattr(out, "images") else out[0]
        images = images if isinstance(images, Tensor) else torch.as_tensor(images)
        return images.float().cpu().clamp(0, 1)

    return generate


def adapter_generator(adapter: Any) -> Generate:
    """A :data:`Generate` over saekit's diffusion adapter (``adapter.generate(prompts,
    seed=...)`` seeds prompt i with ``seed + i``; here each prompt is one call with its own
    seed, so a prompt's sample does not depend on its batch)."""

    def generate(prompts: Sequence[str], seeds: Sequence[int]) -> Tensor:
        images = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            out = adapter.generate([prompt], seed=int(seed))
            images.append(as_image_tensor(out)[0])
        return torch.stack(images)

    return generate


def as_image_tensor(output: Any) -> Tensor:
    """A pipeline's output (``.images`` as a tensor, numpy array or PIL list) as ``(B, 3, H, W)``
    floats in [0, 1]."""
    import numpy as np

    images = getattr(output, "images", output)
    if (
        isinstance(images, (tuple, list))
        and images
        and not isinstance(images[0], (Tensor, np.ndarray))
    ):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images]).astype(np.float32) / 255
    if isinstance(images, (tuple, list)):
        images = images[0]
    tensor = torch.as_tensor(np.asarray(images)) if not isinstance(images, Tensor) else images
    if tensor.ndim == 4 and tensor.shape[-1] in (1, 3) and tensor.shape[1] not in (1, 3):
        tensor = tensor.permute(0, 3, 1, 2)
    return tensor.float().cpu().clamp(0, 1)


@torch.no_grad()
def evaluate_diffusion(
    generate: Generate,
    site: SpliceSite,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    batch_size: int = 16,
    scenes: Sequence[Any] | None = None,
    oracle: Any = None,
    conditions: Sequence[str] = ("clean", "spliced", "spliced_with_error"),
) -> DiffusionResult:
    """Generate ``prompts[i]`` with ``seeds[i]`` under each condition; compare with clean.

    With ``scenes`` (the testbed scene each prompt describes) and an ``oracle`` (with
    ``accuracy(images, scenes) -> {factor: accuracy}``), also report the oracle's accuracy.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; give one seed each")
    if scenes is not None and len(scenes) != len(prompts):
        raise ValueError("give one scene per prompt")
    conditions = ["clean", *[c for c in conditions if c != "clean"]]
    images: dict[str, Tensor] = {}
    in_model = _InModel(site, conditions)
    for condition in conditions:
        parts = []
        for start in range(0, len(prompts), batch_size):
            with site.condition(condition, in_model.observer(condition)):
                parts.append(
                    generate(prompts[start : start + batch_size], seeds[start : start + batch_size])
                )
        images[condition] = torch.cat(parts)  # (N, 3, H, W)
    clean = images["clean"]
    rmse = {
        c: float((im - clean).pow(2).flatten(1).mean(1).sqrt().mean()) for c, im in images.items()
    }
    accuracy: dict[str, dict[str, float]] = {}
    if scenes is not None and oracle is not None:
        accuracy = {c: dict(oracle.accuracy(im, list(scenes))) for c, im in images.items()}
    return DiffusionResult(len(prompts), rmse, accuracy, in_model.metrics())
