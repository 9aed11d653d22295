"""Rule reward for the shapes world: drawn scenes with known ground truth, wrong-prompt negatives,
robustness to noise and blur, graded partial credit."""
from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from solrl_core import scenes
from solrl_core.rewards import judge, load_reward


def _clear(scene: scenes.Scene, spec: scenes.SceneSpec) -> bool:
    """The relation holds with 1 px to spare on both of its conditions (layouts right at the threshold
    are decided by pixel rounding, so they are not ground truth for a pixel-level judge)."""
    if spec.relation is None:
        return True
    a, b = scene.objects
    dx, dy = b.cx - a.cx, b.cy - a.cy
    along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[spec.relation]
    return along - 1 >= 0.15 * scene.size and along - 1 > abs(across) + 1


def _scenes(n_per_kind: int, seed: int = 0, size: int = scenes.DEFAULT_SIZE):
    rng = random.Random(seed)
    out = []
    for kind in scenes.KINDS:
        got = 0
        while got < n_per_kind:
            prompt, scene = scenes.sample_scene(rng, kind, size)
            spec = scenes.parse_prompt(prompt)
            if _clear(scene, spec):
                out.append((prompt, spec, scene))
                got += 1
    return out


SCENES = _scenes(12)  # 36 scenes, all kinds


def _noisy(img: Image.Image, seed: int, sigma: float = 0.05 * 255) -> Image.Image:
    a = np.asarray(img, dtype=np.float32) + np.random.default_rng(seed).normal(0, sigma, (img.height, img.width, 3))
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


def _blurred(img: Image.Image) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(0.7))


def _wrong_prompts(spec: scenes.SceneSpec) -> dict[str, str]:
    """One wrong prompt per check, each differing from the truth in exactly one respect."""
    first = spec.objects[0]
    used = {o.color for o in spec.objects}
    other_color = next(c for c in scenes.COLORS if c not in used)
    other_shape = next(s for s in scenes.SHAPES if s != first.shape)
    wrong = {
        "color": replace(spec, objects=(replace(first, color=other_color),) + spec.objects[1:]),
        "shape": replace(spec, objects=(replace(first, shape=other_shape),) + spec.objects[1:]),
    }
    if spec.relation is None:
        wrong["count"] = replace(spec, objects=(replace(first, count=first.count % 4 + 1),))
    else:
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        wrong["relation"] = replace(spec, relation=opposite[spec.relation])
    return {check: scenes.caption(s) for check, s in wrong.items()}


@pytest.mark.parametrize("degrade", ["clean", "noise", "blur", "noise+blur"])
def test_drawn_scenes_and_wrong_prompts_judged_correctly(degrade):
    assert len(SCENES) >= 20 and {s.kind for _, s, _ in SCENES} == set(scenes.KINDS)
    for i, (prompt, spec, scene) in enumerate(SCENES):
        img = scenes.render(scene)
        if "noise" in degrade:
            img = _noisy(img, i)
        if "blur" in degrade:
            img = _blurred(img)
        j = judge(img, prompt)
        assert j.passed and j.score == 1.0, (degrade, prompt, j.checks, j.blobs)
        for check, wrong in _wrong_prompts(spec).items():
            jw = judge(img, wrong)
            assert not jw.passed and not jw.checks[check], (degrade, prompt, wrong, jw.checks)
            assert jw.score < 1.0


def test_partial_credit_is_graded():
    scene = scenes.Scene([scenes.PlacedObject("red", "circle", 10, 16, 10)])
    img = scenes.render(scene)
    assert judge(img, "a red circle").score == 1.0
    assert judge(img, "a red square").score == 0.75  # colour, count, nothing extra: right; shape: wrong
    j = judge(img, "two red circles")  # one of two: count credit 1 - |1 - 2| / 2
    assert not j.passed and not j.checks["count"] and j.credit["count"] == 0.5 and j.score == 0.875
    assert judge(img, "four red circles").score == (3 + 0.25) / 4
    assert judge(img, "a blue circle").score == 0.0
    assert judge(scenes.render(scenes.Scene([])), "a red circle").score == 0.0  # a blank image earns nothing
    two = scenes.render(scenes.Scene([scenes.PlacedObject("red", "circle", 8, 16, 8),
                                      scenes.PlacedObject("green", "square", 24, 16, 8)]))
    assert judge(two, "a red circle left of a green square").score == 1.0
    assert judge(two, "a red circle right of a green square").score == pytest.approx(0.8)
    j = judge(two, "a red circle")  # half of what was drawn is extra
    assert j.checks == {"color": True, "shape": True, "count": True, "no_extra": False}
    assert j.credit["no_extra"] == 0.5 and j.score == 0.875
    j = judge(two, "a red circle left of a blue square")  # one of two colours, and no relation to judge
    assert j.credit == {"color": 0.5, "shape": 0.5, "count": 0.5, "relation": 0.0, "no_extra": 0.5}
    assert j.score == pytest.approx(0.4)


def test_partial_credit_grows_as_a_count_gets_closer():
    """Three of four objects earn more than two of four; a wrong shape among them costs its share."""
    spots = ((6, 6), (22, 6), (6, 22), (22, 22))
    draw = lambda shapes: scenes.render(scenes.Scene(  # noqa: E731
        [scenes.PlacedObject("blue", s, x, y, 8) for s, (x, y) in zip(shapes, spots)]))
    scores = [judge(draw(["square"] * n), "four blue squares").score for n in (1, 2, 3, 4)]
    assert scores == [(3 + 0.25) / 4, (3 + 0.5) / 4, (3 + 0.75) / 4, 1.0]
    j = judge(draw(["square", "square", "square", "circle"]), "four blue squares")
    assert j.credit["shape"] == 0.75 and j.credit["count"] == 1.0 and j.score == (3 + 0.75) / 4


def test_counts_each_object_and_ignores_specks():
    objs = [scenes.PlacedObject("blue", "triangle", x, y, 7) for x, y in ((6, 6), (20, 8), (8, 22), (24, 24))]
    img = scenes.render(scenes.Scene(objs))
    a = np.asarray(img).copy()
    a[15, 15] = scenes.COLORS["blue"]  # a one-pixel speck is not a fifth object
    a[2, 30] = scenes.COLORS["red"]  # nor an extra red object
    j = judge(Image.fromarray(a), "four blue triangles")
    assert j.passed and len(j.blobs) == 4


def test_larger_images_and_tensor_input():
    for prompt, _, scene in _scenes(3, seed=5, size=64):
        img = scenes.render(scene)
        t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
        assert judge(img, prompt).passed and judge(t, prompt).passed


def test_shapes_scorer_matches_judge_and_flags_unknown_prompts():
    reward = load_reward("shapes")
    imgs = [scenes.render(s) for _, _, s in SCENES[:4]]
    prompts = [p for p, _, _ in SCENES[:4]]
    prompts[1] = _wrong_prompts(SCENES[1][1])["shape"]
    prompts[3] = "a photo of a cat"
    scores = reward(imgs, prompts)
    assert scores[0] == 1.0 and scores[2] == 1.0
    assert scores[1] == pytest.approx(judge(imgs[1], prompts[1]).score) and scores[1] < 1.0
    assert torch.isnan(scores[3])
    with pytest.raises(ValueError, match="'a photo of a cat' is not in the shapes vocabulary"):
        judge(imgs[3], "a photo of a cat")
