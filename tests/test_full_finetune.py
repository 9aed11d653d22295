"""Full fine-tuning: the export loads with diffusers' from_pretrained (and its single file with ComfyUI's
diffusion-model loader), and the update leaves weights that got no gradient exactly where they were, on
one process and on two."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_factories import build_flux, build_sana, build_sd3, save_pipeline
from safetensors import safe_open
from safetensors.torch import load_file

from solrl_core.models import adapter_state, load_adapter_state, load_policy
from solrl_core.models.lora import SAMPLING, TRAINED
from solrl_core.train.export import TRANSFORMER_WEIGHTS, save_lora
from solrl_core.train.session import EMA, TrainingSession
from solrl_core.train.settings import SessionConfig, UpdateSettings

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle", "two blue squares"]
BUILD = {"sana": lambda: build_sana(seed=1, with_vae=False, sample_size=8), "flux": lambda: build_flux(seed=1),
         "sd3": lambda: build_sd3(seed=1)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("full_ft")
    return {family: save_pipeline(build(), root / family) for family, build in BUILD.items()}


def _trained(source, run_dir, dtype=torch.float32) -> TrainingSession:
    """A full fine-tuning session whose trained weights and EMA differ from each other and the base."""
    session = TrainingSession(run_dir, load_policy(str(source), dtype=dtype), PROMPTS,
                              SessionConfig(full_finetune=True))
    model = session.policy.transformer
    g = torch.Generator().manual_seed(7)
    trained = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in adapter_state(model, TRAINED).items()}
    load_adapter_state(model, TRAINED, trained)
    session.ema = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in trained.items()}
    return session


def _velocity(policy, model):
    with torch.no_grad():
        return policy.velocity(model, policy.initial_noise([1, 2]), torch.tensor([0.8, 0.3]), policy.encode(PROMPTS))


@pytest.mark.parametrize("family", list(BUILD))
def test_export_loads_with_from_pretrained_and_reproduces_the_ema_model(folders, tmp_path, family):
    import diffusers

    session = _trained(folders[family], tmp_path / "run")
    policy, model = session.policy, session.policy.transformer
    weights, folder = save_lora(session, EMA, f"{family}_ft")
    assert weights == folder / TRANSFORMER_WEIGHTS and folder == tmp_path / "run" / "transformer" / f"{family}_ft"
    config = json.loads((folder / "config.json").read_text())
    loaded = getattr(diffusers, config["_class_name"]).from_pretrained(str(folder)).eval()
    state = loaded.state_dict()
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], session.ema[k]) for k in session.ema)
    v_loaded = _velocity(policy, loaded)
    load_adapter_state(model, SAMPLING, session.ema)  # the EMA weights through the trained model
    from solrl_core.models import use_adapter

    with use_adapter(model, SAMPLING):
        v_ema = _velocity(policy, model)
    assert torch.equal(v_loaded, v_ema)
    assert (v_ema - _velocity(policy, model)).abs().max() > 1e-3  # the trained weights would differ
    with safe_open(str(weights), "pt") as f:
        info = json.loads(f.metadata()["solrl"])
    assert info["full_finetune"] is True and info["weights"] == EMA and "lora_rank" not in info


def test_export_is_in_the_models_dtype(tmp_path):
    """bf16 model: fp32 master weights, a bf16 file (what a user loads), equal to the EMA rounded once."""
    session = _trained("embedded", tmp_path / "run", dtype=torch.bfloat16)
    weights, _ = save_lora(session, EMA, "tiny")
    state = load_file(weights)
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    assert all(torch.equal(state[k], v.to(torch.bfloat16)) for k, v in session.ema.items())


def _unused_parameter_update(run_dir: Path) -> dict[str, torch.Tensor]:
    """One full fine-tuning update with AdamW weight decay on a model carrying a parameter its forward
    never uses (as a block a family's config skips would be); returns the trained weights. The second
    prompt could not be scored (NaN rewards): on two processes, the second has nothing to train and must
    still add zero gradients to the sums of the weights the first one trained."""
    from solrl_core.runtime import distributed as dp
    from solrl_core.train.samples import SampleBatch
    from solrl_core.train.stages import update

    policy = load_policy("embedded")
    policy.transformer.register_parameter("unused", torch.nn.Parameter(torch.ones(16)))
    session = TrainingSession(run_dir, policy, PROMPTS, SessionConfig(full_finetune=True))
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 2, 3, 32, 32, generator=g).clamp(-1, 1)
    rows = dp.local_rows(2)
    batch = SampleBatch(session, [PROMPTS[i] for i in rows], torch.tensor([[1, 2], [3, 4]])[rows], latents[rows],
                        torch.tensor([[0.0, 1.0], [float("nan")] * 2])[rows], steps=3, prompt_ids=rows)
    stats = update(batch, UpdateSettings(lr=1e-2, weight_decay=0.1, micro_batch=2))
    assert stats["stepped"] == 1 and stats["dropped"] == 2
    return adapter_state(policy.transformer, TRAINED)


# Run by torchrun: each of two processes trains on its prompt; process 0 writes the weights.
_TWO_RANKS = """
import sys, torch
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from safetensors.torch import save_file
from solrl_core.runtime import distributed as dp
from test_full_finetune import _unused_parameter_update
dp.init_from_env()
torch.set_num_threads(1)
weights = _unused_parameter_update(Path(sys.argv[2]))
if dp.is_main():
    save_file({k: v.contiguous() for k, v in weights.items()}, sys.argv[3])
dp.destroy()
"""


def test_weights_without_gradient_stay_untouched_on_one_and_two_processes(tmp_path):
    """AdamW with weight decay 0.1 and lr 1e-2 would shrink a weight by 0.1% per step if it were given a
    zero gradient; with none it must stay exactly 1. Two processes (one prompt each) equal one."""
    one = _unused_parameter_update(tmp_path / "one")
    assert torch.equal(one["unused"], torch.ones(16))
    assert (one["transformer_blocks.0.attn1.to_q.weight"] != load_policy("embedded").transformer
            .state_dict()["transformer_blocks.0.attn1.to_q.weight"]).any()  # the used weights moved
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    out = tmp_path / "two.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(ROOT / "tests"), str(tmp_path / "two"), str(out)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    two = load_file(out)
    assert torch.equal(two["unused"], torch.ones(16))
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < 1e-6, worst  # the same step; gradients summed in another order


# Runs inside ComfyUI's interpreter: its diffusion-model loader (Load Diffusion Model) on our file,
# then the converted weights against ours (FLUX.1 fuses q, k, v and the single blocks' MLP input).
_COMFY_LOAD = r"""
import json, sys
sys.argv = [sys.argv[0], "--cpu"]
args = json.loads(sys.stdin.read())
sys.path.insert(0, args["comfyui"])
import comfy.options
comfy.options.enable_args_parsing()
import comfy.sd, torch
from safetensors.torch import load_file
ours = load_file(args["path"])
patcher = comfy.sd.load_diffusion_model(args["path"])
theirs = patcher.model.diffusion_model.state_dict()
expected = {
    "img_in.weight": ours["x_embedder.weight"],
    "double_blocks.0.img_attn.qkv.weight": torch.cat([ours[f"transformer_blocks.0.attn.to_{c}.weight"] for c in "qkv"]),
    "double_blocks.0.img_mlp.0.weight": ours["transformer_blocks.0.ff.net.0.proj.weight"],
    "single_blocks.0.linear1.weight": torch.cat([ours[f"single_transformer_blocks.0.attn.to_{c}.weight"] for c in "qkv"]
                                                + [ours["single_transformer_blocks.0.proj_mlp.weight"]]),
    "final_layer.linear.weight": ours["proj_out.weight"],
}
print(json.dumps({"model": type(patcher.model).__name__, "tensors": len(theirs),
                  "equal": {k: bool(torch.equal(theirs[k].to(v.dtype), v)) for k, v in expected.items()}}))
"""


@pytest.mark.comfyui
def test_comfyui_diffusion_model_loader_reads_the_flux_export(tmp_path):
    """ComfyUI infers FLUX.1's architecture from tensor shapes, so this needs the real width: a random
    FLUX.1-dev transformer with one double and one single block (0.56 B parameters, 1.1 GB in bf16)."""
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        pytest.skip("COMFYUI_PATH is not set")
    from solrl_core.models.published import build_component, published_folder
    from solrl_core.train.export import write_transformer

    model = build_component(published_folder("flux"), "transformer", "cpu", torch.bfloat16, num_layers=1,
                            num_single_layers=1)
    path = write_transformer(model, {}, torch.bfloat16, tmp_path / "flux_ft")
    del model
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    proc = subprocess.run([python, "-c", _COMFY_LOAD], cwd=comfy, capture_output=True, text=True, timeout=900,
                          input=json.dumps({"comfyui": comfy, "path": str(path)}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["model"] == "Flux" and result["tensors"] > 0
    assert all(result["equal"].values()), result["equal"]
