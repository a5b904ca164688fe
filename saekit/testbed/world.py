"""The testbed world: small RGB scenes of one or two flat shapes whose every factor is known.

A scene is a background colour and one or two objects, each with a shape, a colour, a size and a
cell of a 3x3 grid. Scenes are drawn from a seeded generator, rendered without anti-aliasing (so
every pixel is either the background or exactly one palette colour, which is what makes the
pixel oracle exact) and described by template captions: a canonical sentence ("a large red circle
at the top left on a gray background"), the same facts in shuffled word orders, and partial
captions that mention only some factors ("a red shape", "a circle at the center").

Everything here is plain numpy/torch and cheap: 10,000 scenes render in well under a second.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch

IMAGE_SIZE = 32
"""Images are ``IMAGE_SIZE x IMAGE_SIZE`` RGB."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 35),
    "orange": (250, 135, 20),
    "yellow": (245, 230, 35),
    "green": (30, 170, 60),
    "blue": (40, 80, 230),
    "purple": (150, 50, 200),
}
"""Object colours (sRGB, 0-255), chosen far apart from each other and from every background."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
}

SIZES: dict[str, int] = {"small": 6, "large": 10}
"""Side of an object's bounding box in pixels."""

POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
"""The 3x3 grid in reading order: ``POSITIONS[3 * row + col]``."""

CELL_CENTERS: tuple[int, int, int] = (5, 16, 27)
"""Pixel coordinate of the centre of each grid row/column (an object's box is centred here).

A large object in column 0 covers pixels 0-9, column 1 covers 11-20, column 2 covers 22-31, so
objects in neighbouring cells never touch.
"""

CELL_EDGES: tuple[int, int] = (11, 22)
"""First pixel of grid rows/columns 1 and 2: cell ``c`` spans ``[edge[c-1], edge[c])``."""

FACTORS: tuple[str, ...] = ("shape", "color", "size", "position", "background")
OBJECT_FACTORS: tuple[str, ...] = ("shape", "color", "size", "position")

FACTOR_VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": tuple(SIZES),
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}

# Words the QA prompts of the VLM use beyond the caption words (see `questions`).
QUESTION_WORDS: tuple[str, ...] = (
    "describe",
    "question",
    "answer",
    "what",
    "where",
    "how",
    "many",
    "shapes",
    "are",
    "there",
    "is",
    "one",
    "two",
    "?",
    ":",
)


# --------------------------------------------------------------------------------------------
# scenes


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene: every factor set."""

    shape: str
    color: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for name in OBJECT_FACTORS:
            value = getattr(self, name)
            if value not in FACTOR_VALUES[name]:
                raise ValueError(
                    f"unknown {name} {value!r}; choose one of {', '.join(FACTOR_VALUES[name])}"
                )


@dataclass(frozen=True)
class Scene:
    """A background and one or two objects in distinct grid cells: the labels of one image.

    Objects are kept in reading order of their cells, so equal scenes compare equal.
    """

    background: str
    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.objects, key=lambda o: POSITIONS.index(o.position)))
        object.__setattr__(self, "objects", ordered)
        if self.background not in BACKGROUNDS:
            raise ValueError(
                f"unknown background {self.background!r}; choose one of {', '.join(BACKGROUNDS)}"
            )
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene holds one or two objects, got {len(self.objects)}")
        cells = [o.position for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share the cell {cells[0]!r}; give them distinct cells")

    @property
    def count(self) -> int:
        return len(self.objects)

    def caption(self) -> str:
        """The canonical caption: objects in reading order, every factor in the fixed order."""
        return describe(self).text

    def values(self) -> dict[str, set[str]]:
        """Every factor's values present in the scene (a set: two objects may differ)."""
        present: dict[str, set[str]] = {f: set() for f in FACTORS}
        present["background"].add(self.background)
        for obj in self.objects:
            for f in OBJECT_FACTORS:
                present[f].add(getattr(obj, f))
        return present


def sample_scenes(
    n: int,
    seed: int,
    *,
    p_two: float = 0.3,
    objects: int | None = None,
) -> list[Scene]:
    """Draw ``n`` scenes, every factor uniform and independent; the same seed gives the same list.

    ``p_two`` is the share of two-object scenes (objects in distinct cells); ``objects=1`` or
    ``objects=2`` fixes the count instead.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if objects not in (None, 1, 2):
        raise ValueError(f"objects must be 1, 2 or None (mixed), got {objects}")
    if not 0.0 <= p_two <= 1.0:
        raise ValueError(f"p_two is a probability, got {p_two}")
    rng = np.random.default_rng(seed)
    backgrounds = tuple(BACKGROUNDS)
    colors = tuple(COLORS)
    sizes = tuple(SIZES)
    scenes = []
    for _ in range(n):
        count = objects if objects is not None else 1 + int(rng.random() < p_two)
        cells = rng.choice(len(POSITIONS), size=count, replace=False)
        objs = tuple(
            SceneObject(
                shape=SHAPES[rng.integers(len(SHAPES))],
                color=colors[rng.integers(len(colors))],
                size=sizes[rng.integers(len(sizes))],
                position=POSITIONS[int(cell)],
            )
            for cell in cells
        )
        scenes.append(Scene(background=backgrounds[rng.integers(len(backgrounds))], objects=objs))
    return scenes


def counterfactual(scene: Scene, factor: str, value: str, index: int = 0) -> Scene:
    """``scene`` with one factor changed: the background, or ``factor`` of object ``index``.

    The unit of a controlled comparison: the same scene, red instead of blue. Raises ValueError
    when the change is impossible (a position the other object holds).
    """
    if factor == "background":
        return replace(scene, background=value)
    if factor not in OBJECT_FACTORS:
        raise ValueError(f"unknown factor {factor!r}; choose one of {', '.join(FACTORS)}")
    objects = list(scene.objects)
    objects[index] = replace(objects[index], **{factor: value})
    return Scene(scene.background, tuple(objects))


def variant_groups(
    n_groups: int, group_size: int, seed: int, *, p_two: float = 0.3
) -> tuple[list[Scene], list[str]]:
    """``n_groups`` groups of ``group_size`` scenes that differ in one factor within a group.

    Returns the scenes (group after group) and each group's varied factor. Contrastive training
    on such batches cannot tell its images apart by colour alone, so it must learn shape and
    position too (they are chosen as the varied factor most often).
    """
    rng = np.random.default_rng(seed)
    bases = sample_scenes(n_groups, seed=int(rng.integers(2**31)), p_two=p_two)
    weights = {"shape": 0.45, "position": 0.25, "size": 0.1, "color": 0.1, "background": 0.1}
    scenes: list[Scene] = []
    varied = []
    for base in bases:
        factor = str(rng.choice(list(weights), p=list(weights.values())))
        index = int(rng.integers(base.count))
        taken = {o.position for i, o in enumerate(base.objects) if i != index}
        options = [v for v in FACTOR_VALUES[factor] if not (factor == "position" and v in taken)]
        picks = rng.choice(len(options), size=min(group_size, len(options)), replace=False)
        group = [counterfactual(base, factor, options[int(p)], index) for p in picks]
        while len(group) < group_size:  # size has two values: repeat to fill the group
            group.append(group[len(group) % len(picks)])
        scenes += group
        varied.append(factor)
    return scenes, varied


# --------------------------------------------------------------------------------------------
# rendering


def shape_mask(shape: str, side: int) -> np.ndarray:
    """The ``(side, side)`` boolean mask of ``shape`` filling a box of ``side`` pixels.

    A pixel is inside when its centre is; no anti-aliasing, so pixels are exactly one colour.
    """
    centres = (np.arange(side) + 0.5) / side * 2 - 1  # pixel centres in [-1, 1]
    v, u = np.meshgrid(centres, centres, indexing="ij")  # v: down, u: right
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "circle":
        return u**2 + v**2 <= 1.0
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":  # pointing up: half-width 0 at the top, 1 at the bottom
        return np.abs(u) <= (v + 1) / 2
    if shape == "cross":  # a plus sign with arms a third of the side wide
        return ((np.abs(u) <= 1 / 3) & (np.abs(v) <= 1)) | ((np.abs(v) <= 1 / 3) & (np.abs(u) <= 1))
    raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")


_MASKS = {(s, size): shape_mask(s, side) for s in SHAPES for size, side in SIZES.items()}


def object_box(obj: SceneObject) -> tuple[int, int, int]:
    """``(top, left, side)`` of the object's bounding box in pixels."""
    index = POSITIONS.index(obj.position)
    row, col = divmod(index, 3)
    side = SIZES[obj.size]
    return CELL_CENTERS[row] - side // 2, CELL_CENTERS[col] - side // 2, side


def render_uint8(scenes: Sequence[Scene]) -> np.ndarray:
    """Render scenes to ``(N, H, W, 3)`` uint8 arrays."""
    out = np.empty((len(scenes), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        out[i] = BACKGROUNDS[scene.background]
        for obj in scene.objects:
            top, left, side = object_box(obj)
            patch = out[i, top : top + side, left : left + side]  # (side, side, 3), a view
            patch[_MASKS[obj.shape, obj.size]] = COLORS[obj.color]
    return out


def render(scenes: Sequence[Scene]) -> torch.Tensor:
    """Render scenes to a float tensor ``(N, 3, H, W)`` in ``[0, 1]`` (what the models take)."""
    pixels = torch.from_numpy(render_uint8(scenes))  # (N, H, W, 3)
    return pixels.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def to_pil(images: torch.Tensor | np.ndarray) -> list:
    """``(N, 3, H, W)`` floats in [0, 1] (or ``(N, H, W, 3)`` uint8) to PIL images."""
    from PIL import Image

    if isinstance(images, torch.Tensor):
        images = (
            images.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)
        ).numpy()
    return [Image.fromarray(np.ascontiguousarray(im)) for im in images]


def image_grid(images: torch.Tensor, ncols: int | None = None, pad: int = 2) -> torch.Tensor:
    """Tile ``(N, 3, H, W)`` images into one ``(3, H', W')`` image with white gutters."""
    n, c, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = torch.ones(c, nrows * (h + pad) + pad, ncols * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid


# --------------------------------------------------------------------------------------------
# captions: descriptions (possibly partial facts) <-> text


@dataclass(frozen=True)
class ObjectFacts:
    """What a caption says about one object; ``None`` = not mentioned."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None
    position: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        return all(
            getattr(self, f) is None or getattr(self, f) == getattr(obj, f) for f in OBJECT_FACTORS
        )

    @property
    def mentioned(self) -> tuple[str, ...]:
        return tuple(f for f in OBJECT_FACTORS if getattr(self, f) is not None)


@dataclass(frozen=True)
class Description:
    """The facts a caption states: a possibly partial scene."""

    background: str | None
    objects: tuple[ObjectFacts, ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, scene: Scene) -> Description:
        """The full description of a scene (every factor stated)."""
        return cls(
            background=scene.background,
            objects=tuple(ObjectFacts(o.shape, o.color, o.size, o.position) for o in scene.objects),
        )

    def holds_for(self, scene: Scene) -> bool:
        """True when every stated fact is true of ``scene`` (objects matched one-to-one)."""
        if self.background is not None and self.background != scene.background:
            return False
        if len(self.objects) > len(scene.objects):
            return False
        if len(self.objects) == 1:
            return any(self.objects[0].matches(o) for o in scene.objects)
        if len(self.objects) == 2:
            a, b = self.objects
            x, y = scene.objects
            return (a.matches(x) and b.matches(y)) or (a.matches(y) and b.matches(x))
        return True

    def to_scene(self) -> Scene:
        """The scene this description states; raises ValueError if a factor is missing."""
        if self.background is None or any(len(o.mentioned) < 4 for o in self.objects):
            raise ValueError(f"the description {self} is partial; it does not fix a scene")
        return Scene(
            self.background,
            tuple(
                SceneObject(o.shape, o.color, o.size, o.position)  # type: ignore[arg-type]
                for o in self.objects
            ),
        )


CaptionStyle = Literal["canonical", "shuffled", "partial", "single"]


@dataclass(frozen=True)
class Caption:
    """A caption's text and the facts it states."""

    text: str
    description: Description


def _object_phrase(
    facts: ObjectFacts, rng: np.random.Generator | None
) -> tuple[list[str], list[str]]:
    """``(noun phrase words, position phrase words)`` for one object."""
    adjectives = [a for a in (facts.size, facts.color) if a is not None]
    if rng is not None and len(adjectives) == 2 and rng.random() < 0.5:
        adjectives.reverse()  # "red large circle" as well as "large red circle"
    head = [*adjectives, facts.shape or "shape"]
    noun = ["an" if head[0][0] in "aeiou" else "a", *head]
    where = [] if facts.position is None else ["at", "the", *facts.position.split()]
    return noun, where


def caption_for(description: Description, rng: np.random.Generator | None = None) -> str:
    """Text for ``description``: canonical order when ``rng`` is None, else a random word order.

    Canonical: ``<object> [at the <position>] [and <object> [at the <position>]]
    [on a <background> background]``. The shuffled orders move the position or the background
    phrase to the front (followed by a comma) or swap the two adjectives.
    """
    background = (
        [] if description.background is None else ["on", "a", description.background, "background"]
    )
    phrases = []
    for facts in description.objects:
        noun, where = _object_phrase(facts, rng)
        phrases.append((noun, where))
    if rng is None or len(phrases) != 1:
        words: list[str] = []
        for i, (noun, where) in enumerate(phrases):
            words += (["and"] if i else []) + noun + where
        if rng is not None and background and rng.random() < 0.3:
            return " ".join([*background, ",", *words])
        return " ".join(words + background)
    (noun, where), layout = phrases[0], int(rng.integers(4))
    if layout == 1 and where:  # "at the top left , a red circle on a gray background"
        return " ".join([*where, ",", *noun, *background])
    if layout == 2 and background:  # "on a gray background , a red circle at the top left"
        return " ".join([*background, ",", *noun, *where])
    if layout == 3 and where and background:  # "a red circle on a gray background at the top left"
        return " ".join(noun + background + where)
    return " ".join(noun + where + background)


def describe(
    scene: Scene,
    style: CaptionStyle = "canonical",
    rng: np.random.Generator | None = None,
    *,
    p_drop: float = 0.5,
) -> Caption:
    """A caption of ``scene``.

    ``canonical``: every factor, objects in reading order, fixed word order (what the VLM is
    taught to say). ``shuffled``: every factor, random object and word order. ``partial``: each
    factor is dropped with probability ``p_drop`` (at least one fact is kept), random word order.
    ``single``: one fact (a random factor of a random object, or the background) in the form of
    `factor_prompts` ("a red shape", "a shape at the top left").
    """
    full = Description.of(scene)
    if style == "canonical":  # scene objects are already in reading order
        return Caption(caption_for(full), full)
    if rng is None:
        raise ValueError(f"caption style {style!r} is random: pass rng=np.random.default_rng(...)")
    if style == "single":
        factor = FACTORS[int(rng.integers(len(FACTORS)))]
        if factor == "background":
            description = Description(scene.background, (ObjectFacts(),))
        else:
            obj = scene.objects[int(rng.integers(scene.count))]
            description = Description(None, (ObjectFacts(**{factor: getattr(obj, factor)}),))
        return Caption(caption_for(description), description)
    objects = list(full.objects)
    if len(objects) == 2 and rng.random() < 0.5:
        objects.reverse()
    background = full.background
    if style == "partial":
        while True:
            keep = rng.random((len(objects), 4)) >= p_drop  # (objects, factors)
            keep_background = rng.random() >= p_drop
            if keep.any() or keep_background:
                break
        objects = [
            ObjectFacts(
                **{f: getattr(o, f) if keep[i, j] else None for j, f in enumerate(OBJECT_FACTORS)}
            )
            for i, o in enumerate(objects)
        ]
        background = background if keep_background else None
    elif style != "shuffled":
        raise ValueError(
            f"unknown caption style {style!r}; use canonical, shuffled, partial or single"
        )
    description = Description(background, tuple(objects))
    return Caption(caption_for(description, rng), description)


def factor_prompts(factor: str) -> list[str]:
    """One partial caption per value of ``factor``, for zero-shot classification.

    E.g. ``color`` -> ``["a red shape", "an orange shape", ...]``; ``position`` ->
    ``["a shape at the top left", ...]``; ``background`` -> ``["a shape on a black background", ...]``.
    """
    if factor not in FACTOR_VALUES:
        raise ValueError(f"unknown factor {factor!r}; choose one of {', '.join(FACTORS)}")
    prompts = []
    for value in FACTOR_VALUES[factor]:
        if factor == "background":
            description = Description(value, (ObjectFacts(),))
        else:
            description = Description(None, (ObjectFacts(**{factor: value}),))
        prompts.append(caption_for(description))
    return prompts


def parse_caption(text: str) -> Description:
    """Read the facts back from a caption in any of the word orders that `describe` writes.

    Unknown words are ignored, so a model's slightly wrong caption still yields what it does say;
    an object phrase starts at ``a``/``an`` and its position phrase at ``at the``.
    """
    words = text.replace(",", " ").split()
    background = None
    objects: list[dict[str, str]] = []
    pending_position = None  # "at the top left , a red circle": the place comes first
    i = 0
    while i < len(words):
        w = words[i]
        if (
            w == "on"
            and words[i + 1 : i + 3][:1] == ["a"]
            and words[i + 2 : i + 3]
            and (words[i + 2] in BACKGROUNDS)
        ):  # "on a <background> background"
            background = words[i + 2]
            i += 3
            continue
        if w in ("a", "an"):
            objects.append({} if pending_position is None else {"position": pending_position})
            pending_position = None
        elif w == "at" and words[i + 1 : i + 2] == ["the"]:
            j = i + 2
            place = []
            while j < len(words) and words[j] in ("top", "bottom", "left", "right", "center"):
                place.append(words[j])
                j += 1
            if " ".join(place) in POSITIONS:
                if objects:
                    objects[-1]["position"] = " ".join(place)
                else:
                    pending_position = " ".join(place)
            i = j
            continue
        elif objects:
            for factor in ("shape", "color", "size"):
                if w in FACTOR_VALUES[factor]:
                    objects[-1][factor] = w
        i += 1
    return Description(background, tuple(ObjectFacts(**o) for o in objects))


QUESTION_KINDS: tuple[str, ...] = ("color", "shape", "size", "position", "background", "count")


def questions(scene: Scene) -> list[tuple[str, str, str]]:
    """Every question the VLM learns about ``scene``: ``(kind, question, answer)`` triples.

    Objects are named by their cell ("what color is the shape at the top left ?") or, to ask
    where one is, by colour and shape when that names exactly one object.
    """
    out = []
    for obj in scene.objects:
        at = f"at the {obj.position}"
        out += [
            ("color", f"what color is the shape {at} ?", obj.color),
            ("shape", f"what shape is {at} ?", obj.shape),
            ("size", f"what size is the shape {at} ?", obj.size),
        ]
        if sum(o.color == obj.color and o.shape == obj.shape for o in scene.objects) == 1:
            out.append(("position", f"where is the {obj.color} {obj.shape} ?", obj.position))
    out.append(("background", "what color is the background ?", scene.background))
    out.append(("count", "how many shapes are there ?", "one" if scene.count == 1 else "two"))
    return out


def vocabulary() -> list[str]:
    """Every word a caption or a VLM question can contain, in a fixed order."""
    words: list[str] = ["a", "an", "the", "at", "on", "and", "background", "shape", ","]
    words += list(SHAPES) + list(COLORS) + list(SIZES) + list(BACKGROUNDS)
    words += ["top", "bottom", "left", "right", "center", "size", "color"]
    words += list(QUESTION_WORDS)
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)


# --------------------------------------------------------------------------------------------
# labels as arrays


def _index(factor: str, value: str | None) -> int:
    return -1 if value is None else FACTOR_VALUES[factor].index(value)


def consistency(descriptions: Sequence[Description], scenes: Sequence[Scene]) -> np.ndarray:
    """``(D, S)`` bool: ``descriptions[d].holds_for(scenes[s])`` for every pair, vectorised.

    The positives of a multi-positive contrastive loss: a partial caption such as "a red shape"
    is true of every image with a red object, not only of the image it was written for.
    """
    # scenes: (S, 2, 4) factor indices, absent second object = -9 (never matches); background (S,)
    s_obj = np.full((len(scenes), 2, 4), -9, dtype=np.int64)
    s_bg = np.array([_index("background", s.background) for s in scenes], dtype=np.int64)
    for i, scene in enumerate(scenes):
        for j, obj in enumerate(scene.objects):
            s_obj[i, j] = [_index(f, getattr(obj, f)) for f in OBJECT_FACTORS]
    # descriptions: (D, 2, 4), unmentioned = -1 (matches anything); object count (D,)
    d_obj = np.full((len(descriptions), 2, 4), -1, dtype=np.int64)
    d_bg = np.array([_index("background", d.background) for d in descriptions], dtype=np.int64)
    d_count = np.array([len(d.objects) for d in descriptions])
    for i, d in enumerate(descriptions):
        for j, facts in enumerate(d.objects):
            d_obj[i, j] = [_index(f, getattr(facts, f)) for f in OBJECT_FACTORS]
    present = s_obj[:, :, 0] >= 0  # (S, 2)
    # match[d, s, i, j]: description object i fits scene object j
    fits = (d_obj[:, None, :, None, :] == -1) | (
        d_obj[:, None, :, None, :] == s_obj[None, :, None, :, :]
    )
    match = fits.all(axis=-1) & present[None, :, None, :]  # (D, S, 2, 2)
    one = match[:, :, 0, :].any(axis=-1)
    two = (match[:, :, 0, 0] & match[:, :, 1, 1]) | (match[:, :, 0, 1] & match[:, :, 1, 0])
    objects_ok = np.where(d_count[:, None] == 2, two, np.where(d_count[:, None] == 1, one, True))
    background_ok = (d_bg[:, None] == -1) | (d_bg[:, None] == s_bg[None, :])
    return objects_ok & background_ok


def value_names() -> list[str]:
    """``"factor=value"`` for every factor value, in a fixed order (columns of `presence`)."""
    return [f"{f}={v}" for f in FACTORS for v in FACTOR_VALUES[f]]


def presence(scenes: Iterable[Scene]) -> np.ndarray:
    """``(N, V)`` bool: whether each factor value occurs in each scene (columns: `value_names`).

    The natural target for scoring a dictionary latent against a concept (e.g. AUROC of the
    latent's activation for ``color=red``).
    """
    names = {name: i for i, name in enumerate(value_names())}
    rows = []
    for scene in scenes:
        row = np.zeros(len(names), dtype=bool)
        for factor, values in scene.values().items():
            for v in values:
                row[names[f"{factor}={v}"]] = True
        rows.append(row)
    return np.stack(rows) if rows else np.zeros((0, len(names)), dtype=bool)


def labels(scenes: Sequence[Scene]) -> dict[str, np.ndarray]:
    """Per-factor value indices of the first object (and the background, count) as int arrays.

    For single-object scenes this is the complete label; ``count`` is 1 or 2.
    """
    out = {f: np.empty(len(scenes), dtype=np.int64) for f in (*FACTORS, "count")}
    for i, scene in enumerate(scenes):
        first = scene.objects[0]
        for f in OBJECT_FACTORS:
            out[f][i] = FACTOR_VALUES[f].index(getattr(first, f))
        out["background"][i] = FACTOR_VALUES["background"].index(scene.background)
        out["count"][i] = scene.count
    return out
