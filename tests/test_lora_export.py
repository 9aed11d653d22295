"""Save LoRA: the exported file, loaded by diffusers' `load_lora_weights` into a fresh pipeline,
reproduces the trained adapter; its keys are those ComfyUI's LoRA loader maps for FLUX.1 and SD3.

The ComfyUI part runs ComfyUI's own key mapping (comfy.utils.flux_to_diffusers /
mmdit_to_diffusers and comfy.lora.load_lora) in COMFYUI_PYTHON; it is skipped without COMFYUI_PATH.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from model_factories import BUILDERS, build_flux, build_sana, build_sd3, save_pipeline
from safetensors import safe_open
from safetensors.torch import load_file

from solrl_core.models import adapter_state, adapters_disabled, load_adapter_state, load_policy, use_adapter
from solrl_core.models.lora import SAMPLING, TRAINED
from solrl_core.train.export import save_lora
from solrl_core.train.session import EMA, TrainingSession
from solrl_core.train.settings import SessionConfig

LORA_RANK, ALPHA = 4, 8.0  # alpha != LoRA rank: the scale 2 must be folded into lora_B
PROMPTS = ["a red circle", "two blue squares"]
BUILD = {"sana": lambda: build_sana(seed=1, with_vae=False, sample_size=8), "flux": lambda: build_flux(seed=1),
         "sd3": lambda: build_sd3(seed=1)}
assert set(BUILD) == set(BUILDERS)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_export")
    return {family: save_pipeline(build(), root / family) for family, build in BUILD.items()}


def _trained_session(folder, run_dir) -> TrainingSession:
    """A session whose trained adapter and EMA hold distinct non-zero weights (as after training)."""
    policy = load_policy(str(folder))
    session = TrainingSession(run_dir, policy, PROMPTS, SessionConfig(lora_rank=LORA_RANK, lora_alpha=ALPHA))
    g = torch.Generator().manual_seed(7)
    model = policy.transformer
    trained = {k: 0.2 * torch.randn(v.shape, generator=g) for k, v in adapter_state(model, TRAINED).items()}
    load_adapter_state(model, TRAINED, trained)
    session.ema = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in trained.items()}
    return session


def _inputs(policy):
    sigma = torch.tensor([0.8, 0.3])
    return policy.initial_noise([1, 2]), sigma, policy.encode(PROMPTS)


@pytest.mark.parametrize("family", ["sana", "flux", "sd3"])
@pytest.mark.parametrize("which", [TRAINED, EMA])
def test_diffusers_load_lora_weights_reproduces_the_adapter(folders, tmp_path, family, which):
    from diffusers import DiffusionPipeline

    session = _trained_session(folders[family], tmp_path / "run")
    policy, model = session.policy, session.policy.transformer
    (path,) = save_lora(session, which, f"{family}_{which}")
    assert path == tmp_path / "run" / "lora" / f"{family}_{which}.safetensors"

    x, sigma, cond = _inputs(policy)
    with torch.no_grad():
        if which == EMA:  # evaluate the EMA weights through the sampling adapter's slot
            load_adapter_state(model, SAMPLING, session.ema)
        with use_adapter(model, SAMPLING if which == EMA else TRAINED):
            v_adapter = policy.velocity(model, x, sigma, cond)
        with adapters_disabled(model):
            v_base = policy.velocity(model, x, sigma, cond)

        extra = {"vae": None} if family == "sana" else {}  # the pixel-space fixture has no VAE
        pipe = DiffusionPipeline.from_pretrained(str(folders[family]), **extra)
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="solrl")
        v_loaded = policy.velocity(pipe.transformer, x, sigma, cond)

    assert (v_adapter - v_base).abs().max().item() > 1e-2  # the adapter matters
    assert (v_loaded - v_adapter).abs().max().item() < 1e-4


def test_saved_file_layout_and_metadata(folders, tmp_path):
    session = _trained_session(folders["sana"], tmp_path / "run")
    (path,) = save_lora(session, EMA, "sub/dir/name.safetensors")  # only the file name is used
    assert path == tmp_path / "run" / "lora" / "name.safetensors"
    state = load_file(path)
    modules = _modules(state)
    assert modules and len(state) == 2 * len(modules)  # an A and a B per module, no alpha keys
    for module in modules:
        a, b = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
        assert a.dtype == b.dtype == torch.float32 and a.shape[0] == LORA_RANK and b.shape[1] == LORA_RANK
        key = module[len("transformer."):]
        assert torch.equal(a, session.ema[f"{key}.lora_A.weight"])
        assert torch.equal(b, session.ema[f"{key}.lora_B.weight"] * (ALPHA / LORA_RANK))
    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["solrl"])
    assert info["family"] == "sana" and info["weights"] == EMA and info["lora_rank"] == LORA_RANK
    assert info["iterations"] == 0


_KEY = re.compile(r"^transformer\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def _modules(state: dict) -> list[str]:
    """"transformer.<diffusers module>" of every key; fails on a key outside diffusers' LoRA naming."""
    out = set()
    for key in state:
        m = _KEY.match(key)
        assert m, key
        out.add(f"transformer.{m['module']}")
    return sorted(out)


# The naming rule ComfyUI's loader applies to FLUX.1 and SD3 (comfy/lora.py, model_lora_keys_unet):
# "transformer.<diffusers module>" for the attention projections of the (single) transformer blocks.
RULES = {
    "flux": re.compile(r"^transformer\.(transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)"
                       r"|single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v))$"),
    "sd3": re.compile(r"^transformer\.transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|"
                      r"add_k_proj|add_v_proj|to_add_out)$"),
}


@pytest.fixture(scope="module")
def comfy_loras(folders, tmp_path_factory):
    """FLUX.1 and SD3 LoRA files, with the block counts ComfyUI's mapping needs."""
    out = {}
    for family in RULES:
        session = _trained_session(folders[family], tmp_path_factory.mktemp(family))
        (path,) = save_lora(session, EMA, family)
        cfg = session.policy.transformer.config
        if family == "flux":
            shape = {"depth": cfg.num_layers, "depth_single_blocks": cfg.num_single_layers,
                     "hidden_size": cfg.num_attention_heads * cfg.attention_head_dim}
        else:  # mmdit_to_diffusers: num_blocks joint blocks; its slicing offsets use depth * 64
            shape = {"depth": cfg.num_layers, "num_blocks": cfg.num_layers}
        out[family] = (path, shape)
    return out


@pytest.mark.parametrize("family", list(RULES))
def test_keys_follow_comfyui_naming(comfy_loras, family):
    path, shape = comfy_loras[family]
    modules = _modules(load_file(path))
    assert modules
    assert [m for m in modules if not RULES[family].match(m)] == []
    blocks = {int(m.split(".")[2]) for m in modules if m.startswith("transformer.transformer_blocks.")}
    assert blocks == set(range(shape["num_blocks"] if family == "sd3" else shape["depth"]))
    if family == "flux":
        singles = {int(m.split(".")[2]) for m in modules if m.startswith("transformer.single_transformer_blocks.")}
        assert singles == set(range(shape["depth_single_blocks"]))


# Runs inside ComfyUI's interpreter: its key map for the family, then its LoRA loader on our file.
_COMFY_CHECK = r"""
import json, logging, sys
sys.argv = [sys.argv[0], "--cpu"]
args = json.loads(sys.stdin.read())
sys.path.insert(0, args["comfyui"])
import comfy.options
comfy.options.enable_args_parsing()  # as main.py does, so "--cpu" applies
import comfy.lora, comfy.utils
from safetensors.torch import load_file

to_diffusers = {"flux": comfy.utils.flux_to_diffusers, "sd3": comfy.utils.mmdit_to_diffusers}[args["family"]]
key_map = {}
for k, to in to_diffusers(args["shape"], output_prefix="diffusion_model.").items():
    if k.endswith(".weight"):  # as comfy.lora.model_lora_keys_unet does for these families
        key_map["transformer." + k[:-len(".weight")]] = to
missing = []
class Catch(logging.Handler):
    def emit(self, record):
        if "not loaded" in record.getMessage():
            missing.append(record.getMessage())
logging.getLogger().addHandler(Catch())
lora = load_file(args["path"])
patches = comfy.lora.load_lora(lora, key_map)
print(json.dumps({"mapped": sorted(k for k in key_map if k + ".lora_A.weight" in lora),
                  "patches": len(patches), "missing": missing}))
"""


@pytest.mark.comfyui
@pytest.mark.parametrize("family", list(RULES))
def test_comfyui_maps_every_saved_key(comfy_loras, family):
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        pytest.skip("COMFYUI_PATH is not set")
    path, shape = comfy_loras[family]
    modules = _modules(load_file(path))
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    proc = subprocess.run([python, "-c", _COMFY_CHECK], cwd=comfy, capture_output=True, text=True, timeout=300,
                          input=json.dumps({"comfyui": comfy, "family": family, "shape": shape, "path": str(path)}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["missing"] == []  # comfy.lora.load_lora used every tensor of the file
    assert result["mapped"] == modules  # every saved module has a ComfyUI target
    assert result["patches"] > 0
