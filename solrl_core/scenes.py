"""The embedded model's world: coloured shapes, counts and relative positions.

One vocabulary serves three users: the tiny model's training data (draw + caption), the
rule-based reward (parse a prompt, check an image against it) and the built-in prompt sets.
"""
from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

# Colours are far apart in RGB so a checker can segment them with simple distance masks.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NUMBERS: dict[str, int] = {"one": 1, "two": 2, "three": 3, "four": 4}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
BACKGROUND: tuple[int, int, int] = (20, 20, 20)
KINDS: tuple[str, ...] = ("single", "count", "relation")
DEFAULT_SIZE = 32


@dataclass(frozen=True)
class ObjectSpec:
    """What a prompt asks for: `count` objects of one colour and shape."""

    color: str
    shape: str
    count: int = 1


@dataclass(frozen=True)
class SceneSpec:
    """A parsed prompt. With a relation there are exactly two single objects: a REL b."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    @property
    def kind(self) -> str:
        if self.relation is not None:
            return "relation"
        return "count" if self.objects[0].count > 1 else "single"


@dataclass(frozen=True)
class PlacedObject:
    color: str
    shape: str
    cx: float  # centre, in pixels
    cy: float
    size: float  # side of the bounding square, in pixels


@dataclass
class Scene:
    objects: list[PlacedObject] = field(default_factory=list)
    size: int = DEFAULT_SIZE


def _plural(shape: str) -> str:
    return shape + "s"


def caption(spec: SceneSpec) -> str:
    """The canonical prompt text of a spec (parse_prompt(caption(s)) == s)."""

    def one(o: ObjectSpec) -> str:
        if o.count == 1:
            return f"a {o.color} {o.shape}"
        word = next(w for w, n in NUMBERS.items() if n == o.count)
        return f"{word} {o.color} {_plural(o.shape)}"

    if spec.relation is not None:
        a, b = spec.objects
        return f"{one(a)} {spec.relation} {one(b)}"
    return one(spec.objects[0])


_COLOR_RE = "|".join(COLORS)
_SHAPE_RE = "|".join(SHAPES)
_OBJ_RE = rf"(a|an|{'|'.join(NUMBERS)})\s+({_COLOR_RE})\s+({_SHAPE_RE})s?"
_PROMPT_RE = re.compile(rf"^\s*{_OBJ_RE}(?:\s+({'|'.join(RELATIONS)})\s+{_OBJ_RE})?\s*$")


def parse_prompt(text: str) -> SceneSpec:
    """Parse a prompt of this world; a ValueError names the prompt when it is not one."""
    m = _PROMPT_RE.match(text.lower().replace("  ", " "))
    if m is None:
        raise ValueError(f"prompt {text!r} is not in the shapes vocabulary "
                         f"(e.g. 'a red circle', 'two blue squares', 'a red circle left of a green square')")
    det, color, shape, relation, det2, color2, shape2 = m.groups()
    first = ObjectSpec(color, shape, NUMBERS.get(det, 1))
    if relation is None:
        return SceneSpec((first,))
    second = ObjectSpec(color2, shape2, NUMBERS.get(det2, 1))
    if first.count != 1 or second.count != 1:
        raise ValueError(f"prompt {text!r}: relations are between single objects")
    return SceneSpec((first, second), relation)


def all_specs(kind: str) -> list[SceneSpec]:
    """Every prompt of one kind, in a fixed order (the built-in prompt sets draw from these)."""
    pairs = list(itertools.product(COLORS, SHAPES))
    if kind == "single":
        return [SceneSpec((ObjectSpec(c, s),)) for c, s in pairs]
    if kind == "count":
        return [SceneSpec((ObjectSpec(c, s, n),)) for n in (2, 3, 4) for c, s in pairs]
    if kind == "relation":
        return [
            SceneSpec((ObjectSpec(c1, s1), ObjectSpec(c2, s2)), rel)
            for rel in RELATIONS
            for (c1, s1), (c2, s2) in itertools.product(pairs, pairs)
            if c1 != c2  # same-coloured pairs cannot be told apart by a colour mask
        ]
    raise ValueError(f"unknown scene kind {kind!r}; choose from {KINDS}")


def _box_free(boxes: list[tuple[float, float, float]], cx: float, cy: float, size: float, gap: float) -> bool:
    return all(abs(cx - bx) >= (size + bs) / 2 + gap or abs(cy - by) >= (size + bs) / 2 + gap
               for bx, by, bs in boxes)


def layout(spec: SceneSpec, rng: random.Random, size: int = DEFAULT_SIZE) -> Scene:
    """Place the objects of a spec at random, non-overlapping, with any relation clearly true."""
    for _ in range(1000):
        objs: list[PlacedObject] = []
        boxes: list[tuple[float, float, float]] = []
        n_total = sum(o.count for o in spec.objects)
        # A lone object is drawn large: its shape is then carried by many pixels, which a small model
        # learns in minutes; two to four objects must share the canvas.
        max_side = size * (0.5 if n_total == 1 else 0.34 if n_total == 2 else 0.26)
        min_frac = 0.75 if n_total == 1 else 0.6
        ok = True
        for o in spec.objects:
            for _ in range(o.count):
                side = rng.uniform(min_frac, 1.0) * max_side
                for _ in range(100):
                    cx = rng.uniform(side / 2 + 1, size - side / 2 - 1)
                    cy = rng.uniform(side / 2 + 1, size - side / 2 - 1)
                    if _box_free(boxes, cx, cy, side, gap=2):
                        break
                else:
                    ok = False
                    break
                boxes.append((cx, cy, side))
                objs.append(PlacedObject(o.color, o.shape, cx, cy, side))
        # Drawn relations hold with a pixel to spare, so rasterisation never decides them.
        if ok and (spec.relation is None or relation_holds(spec.relation, objs[0], objs[1], size, margin=1.0)):
            return Scene(objs, size)
    raise RuntimeError(f"could not lay out {caption(spec)!r} in {size}px")


def relation_holds(relation: str, a: PlacedObject | tuple[float, float], b: PlacedObject | tuple[float, float],
                   size: int = DEFAULT_SIZE, margin: float = 0.0) -> bool:
    """a REL b: the centres differ by at least 15% of the image along the relation's axis,
    and by more along that axis than across it (so 'left of' is not mostly 'above')."""
    ax, ay = (a.cx, a.cy) if isinstance(a, PlacedObject) else a
    bx, by = (b.cx, b.cy) if isinstance(b, PlacedObject) else b
    dx, dy = bx - ax, by - ay  # image y grows downwards
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along >= 0.15 * size + margin and along > abs(across) + margin


def render(scene: Scene) -> Image.Image:
    """Draw a scene as an RGB image (flat colours, no anti-aliasing: masks stay clean)."""
    img = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        h = o.size / 2
        box = (o.cx - h, o.cy - h, o.cx + h, o.cy + h)
        color = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse(box, fill=color)
        elif o.shape == "square":
            s = h * 0.85  # equal area-ish with the circle
            draw.rectangle((o.cx - s, o.cy - s, o.cx + s, o.cy + s), fill=color)
        else:
            draw.polygon([(o.cx, o.cy - h), (o.cx - h, o.cy + h), (o.cx + h, o.cy + h)], fill=color)
    return img


def sample_scene(rng: random.Random, kind: str | None = None,
                 size: int = DEFAULT_SIZE) -> tuple[str, Scene]:
    """A random captioned scene (kind drawn uniformly when not given)."""
    kind = kind or rng.choice(KINDS)
    spec = rng.choice(all_specs(kind))
    return caption(spec), layout(spec, rng, size)
