"""Registry, file resolution and its one-line errors, the scoring contract, weighted combination."""
from __future__ import annotations

import io
import random

import pytest
import torch
from PIL import Image

from solrl_core import scenes
from solrl_core.rewards import (
    REWARDS,
    Reward,
    RewardFileNotFoundError,
    WeightedReward,
    load_reward,
    load_weighted_reward,
    parse_reward_spec,
)


class Constant(Reward):
    """A test reward: a fixed value per prompt, NaN for prompts containing 'fail'; counts loads/calls."""

    name = "constant"

    def __init__(self, value: float = 1.0, **kw):
        super().__init__(**kw)
        self.value, self.loads, self.batches = value, 0, []

    def _load(self) -> None:
        self.loads += 1

    def _score_batch(self, images, prompts):
        self.batches.append(len(images))
        return torch.tensor([float("nan") if "fail" in p else self.value + len(p) for p in prompts])


def test_parse_reward_spec():
    assert parse_reward_spec("pickscore:1,hpsv2:0.5, clipscore") == [
        ("pickscore", 1.0), ("hpsv2", 0.5), ("clipscore", 1.0)]
    assert parse_reward_spec("SHAPES:2") == [("shapes", 2.0)]
    with pytest.raises(ValueError, match="unknown reward 'hps'"):
        parse_reward_spec("hps:1")
    with pytest.raises(ValueError, match="weight 'x' of 'ocr'"):
        parse_reward_spec("ocr:x")
    with pytest.raises(ValueError, match="names no reward"):
        parse_reward_spec(" , ")


def test_registry_names_and_unknown_name():
    assert set(REWARDS) == {"hpsv2", "pickscore", "clipscore", "imagereward", "ocr", "shapes",
                            "jpeg_compressibility", "jpeg_incompressibility"}
    with pytest.raises(ValueError, match="unknown reward 'nope'; choose from hpsv2"):
        load_reward("nope")


@pytest.mark.parametrize("name,file", [("hpsv2", "HPS_v2.1_compressed.pt"), ("pickscore", "pickscore"),
                                       ("clipscore", "clipscore"), ("imagereward", "ImageReward.pt")])
def test_missing_weights_is_one_line_at_check_time(name, file, tmp_path, monkeypatch):
    monkeypatch.setenv("SOLRL_MODELS_DIR", str(tmp_path / "models"))
    reward = load_reward(name, search_dirs=[str(tmp_path / "comfy" / "solrl_rewards")])  # lazy: no error yet
    with pytest.raises(RewardFileNotFoundError) as err:
        reward.check_files()
    msg = str(err.value)
    assert "\n" not in msg
    assert file in msg and f"reward '{name}'" in msg
    assert str(tmp_path / "models" / name) in msg and str(tmp_path / "comfy" / "solrl_rewards") in msg
    assert "Hugging Face repo" in msg and "SOLRL_MODELS_DIR" in msg
    with pytest.raises(RewardFileNotFoundError):  # scoring refuses before any compute as well
        reward(torch.rand(1, 3, 8, 8), ["a"])


def test_missing_explicit_path_names_only_that_path(tmp_path, monkeypatch):
    monkeypatch.delenv("SOLRL_MODELS_DIR", raising=False)
    with pytest.raises(RewardFileNotFoundError, match=r"searched: .*nothere\.pt; to fix"):
        load_reward("hpsv2", path=str(tmp_path / "nothere.pt")).check_files()
    with pytest.raises(RewardFileNotFoundError, match="SOLRL_MODELS_DIR is not set"):
        load_reward("hpsv2").check_files()


def test_resolution_order_explicit_then_env_then_search_dirs(tmp_path, monkeypatch):
    env, comfy, explicit = tmp_path / "env", tmp_path / "comfy", tmp_path / "mine.pt"
    (env / "hpsv2").mkdir(parents=True)
    comfy.mkdir()
    for f in (env / "hpsv2" / "HPS_v2.1_compressed.pt", comfy / "HPS_v2_compressed.pt", explicit):
        f.write_bytes(b"x")
    monkeypatch.setenv("SOLRL_MODELS_DIR", str(env))
    assert load_reward("hpsv2", path=str(explicit)).required_files()[0].found == str(explicit)
    assert load_reward("hpsv2", search_dirs=[str(comfy)]).required_files()[0].found == str(
        env / "hpsv2" / "HPS_v2.1_compressed.pt")
    monkeypatch.delenv("SOLRL_MODELS_DIR")
    assert load_reward("hpsv2", search_dirs=[str(comfy)]).required_files()[0].found == str(
        comfy / "HPS_v2_compressed.pt")


def test_weight_free_rewards_need_no_files():
    for name in ("shapes", "jpeg_compressibility", "jpeg_incompressibility"):
        assert load_reward(name).required_files() == []
        load_reward(name).check_files()


def test_contract_lazy_batched_float32_nan_for_bad_images():
    r = Constant(batch_size=2)
    assert r.loads == 0
    images = torch.rand(5, 3, 4, 4)
    images[3, 0, 0, 0] = float("nan")
    out = r(images, ["ab", "c", "fail", "d", "eee"])
    assert r.loads == 1 and r.batches == [2, 2]  # NaN image skipped, 4 scored in batches of 2
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert out[[0, 1, 4]].tolist() == [3.0, 2.0, 4.0]
    assert torch.isnan(out[2]) and torch.isnan(out[3])  # failed prompt, non-finite image
    r(images[:1], "ab")
    assert r.loads == 1
    with pytest.raises(ValueError, match="got 2 images but 3 prompts"):
        r(images[:2], ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        r(torch.rand(2, 4, 4), ["a", "b"])


def test_weighted_reward_total_components_and_nan():
    a, b = Constant(1.0), Constant(10.0)
    w = WeightedReward([(a, 1.0), (b, 0.5), (Constant(0.0), -2.0)])
    total, comps = w.score(torch.rand(3, 3, 4, 4), ["x", "fail", "yy"])
    assert list(comps) == ["constant", "constant#2", "constant#3"]
    assert comps["constant"][0] == 2.0 and comps["constant#2"][0] == 11.0 and comps["constant#3"][0] == 1.0
    assert total[0] == pytest.approx(2.0 + 5.5 - 2.0)
    assert total[2] == pytest.approx(3.0 + 6.0 - 4.0)
    assert torch.isnan(total[1])  # a NaN component stays NaN in the total
    assert torch.equal(w(torch.rand(1, 3, 4, 4), ["x"]), torch.tensor([5.5]))
    assert w.name == "constant:1,constant#2:0.5,constant#3:-2"


def test_weighted_reward_from_spec_checks_every_component(tmp_path, monkeypatch):
    monkeypatch.setenv("SOLRL_MODELS_DIR", str(tmp_path))
    w = load_weighted_reward("shapes:1,jpeg_compressibility:0.1,pickscore:1")
    with pytest.raises(RewardFileNotFoundError, match="reward 'pickscore'"):
        w.check_files()
    ok = load_weighted_reward("shapes:1,jpeg_compressibility:0.1")
    ok.check_files()
    prompt, scene = scenes.sample_scene(random.Random(0), "single")
    img = scenes.render(scene)
    total, comps = ok.score([img], [prompt])
    assert comps["shapes"].item() == 1.0
    assert total.item() == pytest.approx(1.0 + 0.1 * comps["jpeg_compressibility"].item())


def _jpeg_kb(img: Image.Image) -> float:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return len(buf.getvalue()) / 1000


def test_jpeg_rewards_are_signed_sizes_in_kb():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noisy = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noisy])
    comp = load_reward("jpeg_compressibility")(images, ["", ""])
    incomp = load_reward("jpeg_incompressibility")(images, ["", ""])
    from solrl_core.rewards.images import to_pil

    assert incomp.tolist() == pytest.approx([_jpeg_kb(to_pil(im)) for im in images], abs=1e-6)
    assert torch.equal(comp, -incomp)
    assert comp[0] > comp[1] and incomp[1] > 5 * incomp[0]


def test_model_folders_found_under_comfyui_style_names(tmp_path, monkeypatch):
    monkeypatch.delenv("SOLRL_MODELS_DIR", raising=False)
    clip_dir, rewards_dir = tmp_path / "clip", tmp_path / "solrl_rewards"
    for folder in (clip_dir / "PickScore_v1", clip_dir / "clip-vit-large-patch14"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    (rewards_dir / "imagereward" / "bert-base-uncased").mkdir(parents=True)
    (rewards_dir / "imagereward" / "ImageReward.pt").write_bytes(b"x")
    (rewards_dir / "imagereward" / "bert-base-uncased" / "vocab.txt").write_text("[PAD]\n")
    dirs = [str(rewards_dir), str(clip_dir)]
    assert load_reward("pickscore", search_dirs=dirs).required_files()[0].found == str(clip_dir / "PickScore_v1")
    assert load_reward("clipscore", search_dirs=dirs).required_files()[0].found == str(
        clip_dir / "clip-vit-large-patch14")
    ir = load_reward("imagereward", search_dirs=dirs)
    ir.check_files()
    assert ir.required_files()[1].found == str(rewards_dir / "imagereward" / "bert-base-uncased" / "vocab.txt")
    (clip_dir / "PickScore_v1" / "config.json").unlink()  # a folder without config.json is not a model
    with pytest.raises(RewardFileNotFoundError, match="a model folder with config.json"):
        load_reward("pickscore", search_dirs=dirs).check_files()
