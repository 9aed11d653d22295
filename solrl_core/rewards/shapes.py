"""Rule-based reward for the embedded model's world (solrl_core.scenes): GenEval-style checks.

An image is segmented with colour masks (nearest colour of the scenes palette, background excluded),
objects are connected components (specks dropped or merged into a nearby object), each object's shape
is read from its geometry, and relations use scenes.relation_holds on the objects' box centres (the
point scenes.layout places; a triangle's mass centroid sits lower than its box centre).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from .. import scenes
from .base import Reward, logger
from .images import to_pil

_NAMES = list(scenes.COLORS)
_PALETTE = np.array([scenes.COLORS[c] for c in _NAMES] + [scenes.BACKGROUND], dtype=np.float32)
# A pixel belongs to a colour if that colour is its nearest palette entry and it is within this RGB
# distance; the palette is >= 125 apart, so blurred edges halfway to the background are left out.
MAX_COLOR_DISTANCE = 95.0
MIN_AREA_FRACTION = 0.004  # specks below this share of the image are not objects (4 px at 32x32)
MERGE_GAP = 2  # a speck this close (px) to an object of its colour is a fragment of it
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Blob:
    """One detected object."""

    color: str
    shape: str
    area: int
    box: tuple[int, int, int, int]  # y0, x0, y1, x1 (exclusive ends)

    @property
    def center(self) -> tuple[float, float]:
        y0, x0, y1, x1 = self.box
        return (x0 + x1) / 2.0, (y0 + y1) / 2.0


@dataclass(frozen=True)
class Judgement:
    score: float  # mean of the graded checks, in [0, 1]; 1.0 only when every check passes
    passed: bool
    checks: dict[str, bool] = field(default_factory=dict)  # each check, pass / fail
    blobs: tuple[Blob, ...] = ()
    credit: dict[str, float] = field(default_factory=dict)  # each check's partial credit in [0, 1]


def _as_rgb_array(image: Image.Image | torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(to_pil(image), dtype=np.float32)


def color_labels(rgb: np.ndarray) -> np.ndarray:
    """Per pixel: index into scenes.COLORS, or -1 (background or no clear colour)."""
    dist = np.linalg.norm(rgb[:, :, None, :] - _PALETTE[None, None], axis=-1)
    nearest = dist.argmin(-1)
    ok = (nearest < len(_NAMES)) & (dist.min(-1) <= MAX_COLOR_DISTANCE)
    return np.where(ok, nearest, -1)


def membership(rgb: np.ndarray, color: str) -> np.ndarray:
    """How much of each pixel is `color` over the background (0..1): blur moves this mass around but
    keeps its sum, so areas measured with it survive blurring where a hard mask erodes corners."""
    bg = np.asarray(scenes.BACKGROUND, dtype=np.float32)
    axis = np.asarray(scenes.COLORS[color], dtype=np.float32) - bg
    return np.clip((rgb - bg) @ axis / float(axis @ axis), 0.0, 1.0)


def shape_features(weights: np.ndarray, mass: float | None = None) -> tuple[float, float]:
    """(fill of the bounding box, top/bottom width ratio) of an object's membership `weights` cropped to
    its box (`mass`: total membership, including any blur spilled past the box).

    Fill: circle ~0.79, square ~1.0, triangle ~0.5. Widths (vertical symmetry): ~1 for circles and
    squares; a triangle (apex up, as scenes draws it) has a top third far narrower than its bottom third.
    """
    h, w = weights.shape
    fill = float((weights.sum() if mass is None else mass) / (h * w))
    third = max(1, h // 3)
    top, bottom = weights[:third].sum(1).mean(), weights[h - third:].sum(1).mean()
    return fill, float(top / max(bottom, 1e-6))


def classify_shape(weights: np.ndarray, mass: float | None = None) -> str:
    """Triangle if its top is much narrower than its bottom, else square if it fills its box, else circle.
    Thresholds sit midway between the feature ranges measured on clean, noisy and blurred renders
    (widths: triangle <= 0.55, others >= 0.96; fill: circle <= 0.81, square >= 0.97)."""
    fill, widths = shape_features(weights, mass)
    if widths < 0.75:
        return "triangle"
    return "square" if fill > 0.89 else "circle"


def find_objects(image: Image.Image | torch.Tensor | np.ndarray) -> list[Blob]:
    """Segment an image into coloured objects (see the module docstring)."""
    rgb = _as_rgb_array(image)
    labels = color_labels(rgb)
    min_area = max(3, round(MIN_AREA_FRACTION * labels.size))
    blobs: list[Blob] = []
    for ci, color in enumerate(_NAMES):
        comp, n = ndimage.label(labels == ci, structure=_EIGHT)
        if n == 0:
            continue
        areas = np.bincount(comp.ravel(), minlength=n + 1)
        big = [k for k in range(1, n + 1) if areas[k] >= min_area]
        for k in range(1, n + 1):  # fold specks into a nearby object of the same colour, else drop them
            if areas[k] >= min_area or not big:
                continue
            near = ndimage.binary_dilation(comp == k, structure=_EIGHT, iterations=MERGE_GAP)
            hits = [b for b in np.unique(comp[near]) if b in big]
            if hits:
                comp[comp == k] = hits[0]
        weights = membership(rgb, color)
        weights[(labels >= 0) & (labels != ci)] = 0.0  # a neighbour of another colour is not this object
        for k in big:
            mask = comp == k
            # the object's membership: its pixels plus a 2 px halo (blurred edges), minus other objects
            halo = ndimage.binary_dilation(mask, structure=_EIGHT, iterations=2) & ((comp == 0) | mask)
            w = np.where(halo, weights, 0.0)
            # box at half membership: where a blurred edge was, whatever the colour's distance threshold
            ys, xs = np.nonzero((w >= 0.5) | mask)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            shape = classify_shape(w[y0:y1, x0:x1], float(w.sum()))
            blobs.append(Blob(color, shape, int(mask.sum()), (int(y0), int(x0), int(y1), int(x1))))
    return blobs


def judge(image: Image.Image | torch.Tensor | np.ndarray, prompt: str) -> Judgement:
    """Check an image against a prompt of the shapes world.

    Checks, each passed or failed and graded with partial credit in [0, 1] (1 exactly when it passes):
    color (share of the requested colours present), shape (share of the objects of each requested
    colour that have the requested shape), count (per requested colour 1 - |found - wanted| / wanted,
    at least 0), relation (for 'a REL b' prompts; pass or fail), no_extra (share of the objects found
    that have a requested colour; 0 when nothing was found). Score = mean of the credits: a model two
    objects off the requested count earns less than one off, which gives RL a gradient where a
    pass / fail count gives none. A ValueError names the prompt if it is not in the vocabulary.
    """
    spec = scenes.parse_prompt(prompt)
    blobs = find_objects(image)
    size = _as_rgb_array(image).shape[1]
    wanted: dict[str, list[scenes.ObjectSpec]] = {}
    for o in spec.objects:
        wanted.setdefault(o.color, []).append(o)
    by_color = {c: [b for b in blobs if b.color == c] for c in wanted}

    def right_shapes(c: str) -> float:
        found = by_color[c]
        return sum(b.shape in {o.shape for o in wanted[c]} for b in found) / len(found) if found else 0.0

    def count_closeness(c: str) -> float:
        n = sum(o.count for o in wanted[c])
        return max(0.0, 1.0 - abs(len(by_color[c]) - n) / n)

    credit = {
        "color": float(np.mean([bool(by_color[c]) for c in wanted])),
        "shape": float(np.mean([right_shapes(c) for c in wanted])),
        "count": float(np.mean([count_closeness(c) for c in wanted])),
    }
    if spec.relation is not None:
        a, b = spec.objects
        credit["relation"] = float(_relation(spec.relation, a, b, blobs, size))
    credit["no_extra"] = sum(b.color in wanted for b in blobs) / len(blobs) if blobs else 0.0
    checks = {name: value == 1.0 for name, value in credit.items()}
    return Judgement(float(np.mean(list(credit.values()))), all(checks.values()), checks, tuple(blobs), credit)


def _pick(obj: scenes.ObjectSpec, blobs: list[Blob], exclude: Blob | None = None) -> Blob | None:
    """The object standing for `obj`: the largest of its colour, preferring its shape."""
    cands = [b for b in blobs if b.color == obj.color and b is not exclude]
    cands.sort(key=lambda b: (b.shape == obj.shape, b.area), reverse=True)
    return cands[0] if cands else None


def _relation(relation: str, a: scenes.ObjectSpec, b: scenes.ObjectSpec, blobs: list[Blob], size: int) -> bool:
    ba = _pick(a, blobs)
    bb = _pick(b, blobs, exclude=ba)
    if ba is None or bb is None:
        return False
    return scenes.relation_holds(relation, ba.center, bb.center, size)


class ShapesReward(Reward):
    """judge(image, prompt).score as a reward; NaN (with a warning) for prompts outside the vocabulary."""

    name = "shapes"
    default_batch_size = 64

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        out = []
        for image, prompt in zip(images, prompts):
            try:
                out.append(judge(image, prompt).score)
            except ValueError as e:
                logger.warning("reward 'shapes': %s; scored NaN", e)
                out.append(float("nan"))
        return torch.tensor(out, dtype=torch.float32)
