"""Adapters against the diffusers pipelines they wrap: tiny SANA, FLUX.1 and SD3.5 built offline."""
from __future__ import annotations

import shutil

import pytest
import torch
from model_factories import BUILDERS, build_sana, save_pipeline, write_hf_cache

from solrl_core.models import (
    ModelNotFoundError,
    adapter_state,
    add_lora,
    load_adapter_state,
    load_policy,
    make_inference_copy,
    use_adapter,
)
from solrl_core.models.flux import pack, unpack
from solrl_core.sampling import sample

FAMILIES = ("sana", "flux", "sd3")
PROMPT = "two red circles left of a blue square"
SIZE = 32  # pixels
SETTINGS = {"max_sequence_length": 16}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pipelines")
    return {fam: save_pipeline(BUILDERS[fam](seed=1), root / fam) for fam in FAMILIES}


@pytest.fixture(scope="module")
def policies(saved) -> dict:
    extra = {"sana": {"complex_human_instruction": False}}
    return {fam: load_policy(str(saved[fam]), **SETTINGS, **extra.get(fam, {})) for fam in FAMILIES}


def _reload_pipeline(fam: str, path):
    from diffusers import FluxPipeline, SanaPipeline, StableDiffusion3Pipeline

    cls = {"sana": SanaPipeline, "flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}[fam]
    pipe = cls.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_latents(fam: str, pipe, policy, seeds: list[int], steps: int) -> torch.Tensor:
    """The pipeline's own result, no CFG, per-seed generators, returned unpacked [B, C, h, w]."""
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    common = dict(prompt=PROMPT, num_images_per_prompt=len(seeds), height=SIZE, width=SIZE,
                  num_inference_steps=steps, generator=generators, output_type="latent", guidance_scale=1.0,
                  max_sequence_length=SETTINGS["max_sequence_length"])
    if fam == "sana":
        # Sol-RL's SANA schedule passed as explicit sigmas (the tiny scheduler has shift 1).
        sigmas = policy.sigmas(steps)[:-1].tolist()
        return pipe(**common, sigmas=sigmas, use_resolution_binning=False, complex_human_instruction=None).images
    latents = pipe(**common).images
    if fam == "flux":
        c, h, w = policy.latent_shape(SIZE, SIZE)
        latents = unpack(latents, c, h, w)
    return latents


def test_family_is_detected_from_model_index(policies):
    assert {fam: p.family for fam, p in policies.items()} == {f: f for f in FAMILIES}
    assert policies["sana"].default_solver == "euler"
    assert policies["flux"].default_solver == policies["sd3"].default_solver == "dpm2"


@pytest.mark.parametrize("fam", FAMILIES)
def test_velocity_equals_direct_transformer_call(fam, policies):
    policy = policies[fam]
    cond = policy.encode([PROMPT, "a green triangle"])
    x = policy.initial_noise([3, 4], SIZE, SIZE)
    sigma = torch.tensor([0.7, 0.25])
    tr = policy.transformer
    with torch.no_grad():
        v = policy.velocity(tr, x, sigma, cond)
        t = sigma * 1000
        if fam == "sana":
            direct = tr(x, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask,
                        timestep=t * tr.config.timestep_scale, return_dict=False)[0]
        elif fam == "flux":
            from diffusers import FluxPipeline

            c, h, w = x.shape[1:]
            img_ids = FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, x.device, x.dtype)
            txt_ids = torch.zeros(cond.embeds.shape[1], 3)
            out = tr(hidden_states=FluxPipeline._pack_latents(x, 2, c, h, w), timestep=t / 1000,
                     guidance=torch.ones(2), pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds,
                     txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
            direct = FluxPipeline._unpack_latents(out, SIZE, SIZE, policy.spatial_factor)
        else:
            direct = tr(hidden_states=x, timestep=t, encoder_hidden_states=cond.embeds,
                        pooled_projections=cond.pooled, return_dict=False)[0]
    assert v.shape == x.shape
    assert torch.equal(v, direct)


@pytest.mark.parametrize("fam", FAMILIES)
def test_euler_through_adapter_reproduces_pipeline_exactly(fam, saved, policies):
    policy = policies[fam]
    pipe = _reload_pipeline(fam, saved[fam])
    seeds, steps = [11, 12], 4
    expected = _pipeline_latents(fam, pipe, policy, seeds, steps)
    cond = policy.encode([PROMPT])
    # The pipelines' schedulers are Euler; FLUX/SD3 use their family schedule, SANA the given sigmas.
    ours = sample(policy, policy.transformer, cond, seeds, steps, solver="euler", height=SIZE, width=SIZE)
    assert ours.shape == expected.shape
    assert torch.equal(ours, expected.float()), (ours - expected).abs().max()


@pytest.mark.parametrize("fam", FAMILIES)
def test_seed_gives_same_image_alone_and_in_batch_of_24(fam, policies):
    policy = policies[fam]
    cond = policy.encode([PROMPT])
    seeds = list(range(100, 124))
    batch = sample(policy, policy.transformer, cond, seeds, 3, height=SIZE, width=SIZE)
    alone = sample(policy, policy.transformer, cond, [seeds[7]], 3, height=SIZE, width=SIZE)
    chunked = sample(policy, policy.transformer, cond, seeds, 3, height=SIZE, width=SIZE, batch_size=5)
    img_batch, img_alone = policy.decode(batch[7:8]), policy.decode(alone)
    assert img_batch.shape == (1, 3, SIZE, SIZE) and 0 <= img_batch.min() and img_batch.max() <= 1
    assert (img_batch - img_alone).abs().max().item() <= 1e-5
    assert (batch - chunked).abs().max().item() <= 1e-5
    assert (batch[0] - batch[1]).abs().mean() > 0.1  # different seeds differ


def test_noise_depends_only_on_seed(policies):
    policy = policies["sd3"]
    together = policy.initial_noise([5, 6, 7], SIZE, SIZE)
    assert torch.equal(together[1:2], policy.initial_noise([6], SIZE, SIZE))
    expected = torch.randn((1, *policy.latent_shape(SIZE, SIZE)), generator=torch.Generator().manual_seed(6))
    assert torch.equal(together[1:2], expected)


@pytest.mark.parametrize("fam", FAMILIES)
def test_merged_old_adapter_matches_peft_model(fam, saved):
    policy = load_policy(str(saved[fam]), **SETTINGS)
    model = add_lora(policy, lora_rank=4, lora_alpha=8)
    torch.manual_seed(3)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in adapter_state(model, "default").items()}
    load_adapter_state(model, "old", state)
    copy = make_inference_copy(policy, "old")
    cond = policy.encode([PROMPT]).index([0, 0])
    x = policy.initial_noise([1, 2], SIZE, SIZE)
    sigma = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        with use_adapter(model, "old"):
            v_old = policy.velocity(model, x, sigma, cond)
        v_default = policy.velocity(model, x, sigma, cond)
        v_copy = policy.velocity(copy, x, sigma, cond)
    assert (v_copy - v_old).abs().max().item() < 1e-5
    assert (v_default - v_old).abs().max().item() > 1e-3  # the two adapters really differ
    assert not any("lora" in n for n, _ in copy.named_parameters())


def test_family_schedules(policies):
    sana = policies["sana"].sigmas(4)
    assert torch.allclose(sana, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    flux = policies["flux"].sigmas(4, SIZE, SIZE)
    sd3 = policies["sd3"].sigmas(4, SIZE, SIZE)
    for s in (flux, sd3):
        assert len(s) == 5 and s[0] == 1.0 and s[-1] == 0.0 and bool((s[1:] < s[:-1]).all())
    # SD3.5's default: shift 3, sigma' = 3s / (1 + 2s), applied to a linspace from 1 to the smallest
    # shifted training sigma.
    def shift(s):
        return 3 * s / (1 + 2 * s)

    t = torch.linspace(1.0, shift(torch.tensor(1 / 1000)).item(), 4)
    assert torch.allclose(sd3[:-1], shift(t), atol=1e-6)
    # FLUX: exponential shift exp(mu) / (exp(mu) + 1/s - 1) of linspace(1, 1/4)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (((SIZE // 2) // 2) ** 2 - 256)
    t = torch.linspace(1.0, 0.25, 4)
    expected = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / t - 1))
    assert torch.allclose(flux[:-1], expected, atol=1e-6)


def test_pack_unpack_roundtrip():
    x = torch.randn(2, 4, 6, 8)
    assert torch.equal(unpack(pack(x), 4, 6, 8), x)


def test_load_by_repo_id_from_offline_cache(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    write_hf_cache(saved["sd3"], tmp_path, "tiny-org/tiny-sd3")
    policy = load_policy("tiny-org/tiny-sd3", **SETTINGS)
    reference = load_policy(str(saved["sd3"]), **SETTINGS)
    assert policy.family == "sd3"
    for (n, a), (_, b) in zip(policy.transformer.state_dict().items(), reference.transformer.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(ModelNotFoundError) as err:
        load_policy("tiny-org/not-there")
    message = str(err.value)
    assert "\n" not in message and "tiny-org/not-there" in message and str(tmp_path) in message
    assert "download" in message


def test_incomplete_folder_and_bad_inputs_give_one_line_errors(saved, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved["flux"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelNotFoundError, match="incomplete") as err:
        load_policy(str(broken))
    assert "\n" not in str(err.value) and "vae" in str(err.value)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_policy(str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFoundError, match="base="):
        load_policy(str(saved["sana"] / "transformer" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="unknown model family"):
        load_policy(str(saved["sana"]), family="dalle")
    assert isinstance(ModelNotFoundError("x"), FileNotFoundError)


def test_single_file_transformer_with_base_folder(saved, tmp_path):
    from safetensors.torch import save_file

    reference = load_policy(str(saved["flux"]), **SETTINGS)
    with torch.no_grad():
        for p in reference.transformer.parameters():
            p.mul_(1.5)  # a "fine-tuned" transformer differs from the base folder's
    file = tmp_path / "flux_finetuned.safetensors"
    save_file({k: v.contiguous() for k, v in reference.transformer.state_dict().items()}, str(file))
    policy = load_policy(str(file), base=str(saved["flux"]), **SETTINGS)
    assert policy.family == "flux"
    for n, t in reference.transformer.state_dict().items():
        assert torch.equal(policy.transformer.state_dict()[n], t), n


def test_pixel_space_sana_latents_are_pixels(tmp_path):
    folder = save_pipeline(build_sana(seed=2, with_vae=False, sample_size=16), tmp_path / "pixel_sana")
    policy = load_policy(str(folder), **SETTINGS)
    assert policy.vae is None and policy.complex_human_instruction == ()
    assert policy.resolution == (16, 16) and policy.latent_shape() == (3, 16, 16)
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert torch.equal(policy.decode(x)[0, 0, 0], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    x0 = sample(policy, policy.transformer, policy.encode(["a red circle"]), [1, 2], 2)
    assert x0.shape == (2, 3, 16, 16) and torch.isfinite(x0).all()


def test_sana_complex_human_instruction_is_a_setting(saved):
    plain = load_policy(str(saved["sana"]), **SETTINGS, complex_human_instruction=False)
    with_chi = load_policy(str(saved["sana"]), **SETTINGS, complex_human_instruction=True)
    assert plain.complex_human_instruction == ()
    assert with_chi.complex_human_instruction[0].startswith("Given a user prompt")
    a, b = plain.encode([PROMPT]), with_chi.encode([PROMPT])
    assert a.embeds.shape == b.embeds.shape == (1, 16, a.embeds.shape[-1])
    assert not torch.equal(a.embeds, b.embeds)  # the instruction changes the context the prompt is read in


@pytest.mark.parametrize("fam", FAMILIES)
def test_declared_lora_targets_name_real_modules(fam, policies):
    policy = policies[fam]
    names = [n for n, _ in policy.transformer.named_modules()]
    for target in policy.lora_target_modules:
        assert any(n == target or n.endswith("." + target) for n in names), target
