"""``saekit.steer``: install interventions on a model, get back a handle that removes them.

    with saekit.steer(pipe, sae, features=[12], strength=8.0, scope=Scope(steps=(0, 5))):
        images = pipe(prompts).images
    with saekit.steer(vlm, {"model.language_model.layers.2": sae},
                      [Intervention([7], kind="set", strength=3.0, relative=True)],
                      typical=selection):
        text = model.generate(...)

The model is anything :func:`saekit.adapters.adapter_for` wraps (a diffusers pipeline, a
transformers CLIP or LLaVA model, any ``nn.Module``) or an adapter; the dictionaries are one
``SparseAutoencoder`` (at its own ``cfg.hookpoint``) or a dict ``hookpoint -> dictionary``.
Every hookpoint gets one forward hook (:func:`~saekit.evaluation.splice.hook_activation`,
prepended so it runs before the library's own recording hooks), and a :class:`CallTracker`
keeps the step, CFG half and decoding phase of each call. Leaving the ``with`` block (or
:meth:`SteeringHandle.remove`) removes every hook, also when the block raised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from ..adapters import adapter_for
from ..adapters.base import Capture, ModelAdapter
from ..dictionaries import SparseAutoencoder
from ..evaluation.splice import HookHandle, Layout, hook_activation
from .config import Intervention, Kind, Scope
from .context import CallTracker
from .hooks import SteeringTransform
from .selection import Selection


def _split_hookpoint(name: str, default: Capture) -> tuple[str, Capture]:
    """``"blocks.3@update"`` -> ``("blocks.3", "update")`` (the cache's naming)."""
    module, at, capture = name.partition("@")
    if not at:
        return module, default
    if capture not in ("output", "input", "update"):
        raise ValueError(f"hookpoint {name!r}: unknown capture {capture!r}")
    return module, capture  # type: ignore[return-value]


def as_dictionaries(
    saes: SparseAutoencoder | Mapping[str, SparseAutoencoder],
) -> dict[str, SparseAutoencoder]:
    """``hookpoint -> dictionary`` from one dictionary (its ``cfg.hookpoint``) or a mapping."""
    if isinstance(saes, SparseAutoencoder):
        if saes.cfg.hookpoint is None:
            raise ValueError(
                "the dictionary's config names no hookpoint; pass {hookpoint: sae} instead"
            )
        name = saes.cfg.hookpoint
        if saes.cfg.capture != "output" and "@" not in name:
            name = f"{name}@{saes.cfg.capture}"
        return {name: saes}
    return dict(saes)


class SteeringHandle:
    """The installed interventions: a context manager that removes every hook on exit.

    ``report()`` says what was applied (each intervention, the calls and rows it edited).
    """

    def __init__(
        self,
        adapter: ModelAdapter,
        tracker: CallTracker,
        transforms: dict[str, SteeringTransform],
        hooks: list[HookHandle],
    ) -> None:
        self.adapter = adapter
        self.tracker = tracker
        self.transforms = transforms
        self.hooks = hooks

    @property
    def active(self) -> bool:
        return any(h.active for h in self.hooks)

    @property
    def calls(self) -> dict[str, int]:
        """Calls that reached each hookpoint while installed."""
        return {h.hookpoint: h.calls for h in self.hooks}

    def report(self) -> list[dict[str, Any]]:
        out = []
        for hookpoint, transform in self.transforms.items():
            for intervention, applied in zip(
                transform.interventions, transform.applied, strict=True
            ):
                entry = intervention.to_dict()
                entry["hookpoint"] = hookpoint
                entry["applied_calls"] = applied.calls
                entry["applied_rows"] = applied.rows
                out.append(entry)
        return out

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.tracker.remove()

    def __enter__(self) -> SteeringHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _typical_for(
    typical: Selection | Sequence[Selection] | Mapping[str, Tensor] | Tensor | None,
    hookpoint: str,
    sae: SparseAutoencoder,
    single: bool,
) -> Tensor | None:
    if typical is None:
        return None
    if isinstance(typical, Tensor):
        if not single:
            raise ValueError(
                "typical= as one tensor needs one dictionary; give a dict by hookpoint"
            )
        return typical
    if isinstance(typical, Selection):
        return typical.typical_tensor(hookpoint, sae.d_sae)
    if isinstance(typical, Mapping):
        return typical.get(hookpoint)
    found = None
    for selection in typical:
        tensor = selection.typical_tensor(hookpoint, sae.d_sae)
        if tensor is not None:
            found = tensor if found is None else found.where(found != 0, tensor)
    return found


def steer(
    model: Any,
    saes: SparseAutoencoder | Mapping[str, SparseAutoencoder],
    interventions: Intervention | Sequence[Intervention] | None = None,
    *,
    features: int | Sequence[int] | None = None,
    kind: Kind = "add",
    strength: float = 1.0,
    relative: bool = False,
    scope: Scope | None = None,
    typical: Selection | Sequence[Selection] | Mapping[str, Tensor] | Tensor | None = None,
    layout: Layout = "auto",
) -> SteeringHandle:
    """Install ``interventions`` (or one built from ``features``, ``kind``, ``strength``,
    ``relative`` and ``scope``) on ``model`` and return the handle that removes them.

    ``typical``: each latent's typical activation for relative strengths: a
    :class:`~.selection.Selection` (or several), a dict ``hookpoint -> (d_sae,)`` or one tensor.
    An empty list of interventions installs nothing that changes the model.
    """
    adapter = adapter_for(model)
    dictionaries = as_dictionaries(saes)
    if not dictionaries:
        raise ValueError("steer needs at least one dictionary")
    if interventions is None:
        if features is None:
            raise ValueError("give interventions, or features= (with kind=, strength=, scope=)")
        features = (features,) if isinstance(features, int) else tuple(features)
        interventions = [
            Intervention(
                features, kind=kind, strength=strength, relative=relative, scope=scope or Scope()
            )
        ]
    elif isinstance(interventions, Intervention):
        interventions = [interventions]
    by_hookpoint: dict[str, list[Intervention]] = {}
    for intervention in interventions:
        name = intervention.hookpoint
        if name is None:
            if len(dictionaries) != 1:
                raise ValueError(
                    f"an intervention names no hookpoint but {len(dictionaries)} dictionaries "
                    f"were given ({', '.join(dictionaries)}); set Intervention.hookpoint"
                )
            name = next(iter(dictionaries))
        if name not in dictionaries:
            raise ValueError(
                f"no dictionary for hookpoint {name!r}; given: {', '.join(dictionaries)}"
            )
        by_hookpoint.setdefault(name, []).append(intervention)

    tracker = CallTracker(adapter)
    transforms: dict[str, SteeringTransform] = {}
    hooks: list[HookHandle] = []
    try:
        for name, items in by_hookpoint.items():
            sae = dictionaries[name]
            module, capture = _split_hookpoint(name, sae.cfg.capture)
            transform = SteeringTransform(
                sae,
                items,
                module,
                tracker=tracker,
                typical=_typical_for(typical, name, sae, len(dictionaries) == 1),
                adapter=adapter,
                layout=layout,
            )
            transforms[name] = transform
            hooks.append(hook_activation(adapter, module, capture, transform))
    except Exception:
        for hook in hooks:
            hook.remove()
        tracker.remove()
        raise
    return SteeringHandle(adapter, tracker, transforms, hooks)
