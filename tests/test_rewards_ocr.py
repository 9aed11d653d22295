"""OCR reward: text drawn with PIL's built-in font, read back by the wheel-shipped OCR engine."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from solrl_core.rewards import load_reward
from solrl_core.rewards.ocr import levenshtein, quoted_text, text_match


def test_edit_distance_score_and_target_extraction():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert text_match("Hello World", "hello world") == 1.0  # case and spaces do not count
    assert text_match("helo world", "Hello World") == pytest.approx(1 - 1 / 10)
    assert text_match("something much longer than the target", "cat") == 0.0  # clipped at len(target)
    assert quoted_text('a neon sign that says "Open 24 Hours" at night') == "Open 24 Hours"
    assert quoted_text("a shop sign “Bäckerei”") == "Bäckerei"
    assert quoted_text('"two" parts "here"') == "two here"
    assert quoted_text("no quotes here") is None


def _sign(text: str) -> Image.Image:
    img = Image.new("RGB", (320, 96), (235, 230, 220))
    ImageDraw.Draw(img).text((12, 28), text, fill=(20, 20, 60), font=ImageFont.load_default(size=36))
    return img


@pytest.fixture(scope="module")
def ocr():
    pytest.importorskip("rapidocr_onnxruntime")
    return load_reward("ocr")


def test_ocr_reward_on_drawn_text(ocr):
    images = [_sign("Hello World"), _sign("open sesame"), _sign("Hello World"), _sign("")]
    prompts = ['a sign that says "Hello World"', 'a door with "Open Sesame" written on it',
               'a poster that says "banana bread"', 'a blank sign "Hello World"']
    ocr.check_files()
    scores = ocr(images, prompts)
    assert scores[0] >= 0.9 and scores[1] >= 0.9  # the exact strings
    assert scores[2] <= 0.3  # an unrelated string
    assert scores[3] == 0.0  # nothing to read
    assert torch.equal(ocr(images[:2], prompts[:2]), scores[:2])  # deterministic


def test_prompt_without_quoted_text_scores_nan(ocr):
    scores = ocr([_sign("Hello World")], ["a sign"])
    assert math.isnan(scores.item())
