"""The pack inside a real ComfyUI, started headless on CPU (skipped without COMFYUI_PATH), and the
images its output nodes make, checked headless too.

The training tests queue the quickstart workflow (small sizes, a tiny offline SANA placed in
models/diffusers) through POST /prompt, as the ComfyUI frontend does, and read the run directory
ComfyUI's output folder gets.
"""
import io
import json
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from comfyui_server import ComfyServer, message_types, succeeded, ui_images
from PIL import Image

from solrl_core.bundled import BUNDLED, WORKFLOWS_DIR, Recipe, training_graph
from solrl_core.graph.validate import validate
from solrl_core.graph.workflow import load_workflow
from solrl_core.ops.registry import all_ops

live = pytest.mark.comfyui  # the tests that need a real ComfyUI (COMFYUI_PATH)

MODEL = "tiny_sana"
# 2 prompts x 4 drafts, keep 2, 2 draft / 2 full steps: seconds per iteration on one CPU core.
SMALL = Recipe(model=MODEL, run_name="live", iterations=6, prompts_per_iteration=2, candidates=4, keep=2,
               draft_steps=2, full_steps=2, min_dim=0, lr=1e-2, micro_batch=4, lora_rank=4, lora_alpha=4.0,
               batch_size=8)
PER_QUEUE = 2  # Loop Start iterations; Training Run's total_iterations (6) is larger
ROW_KEYS = ("reward_mean", "draft_reward_mean", "loss", "grad_norm")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from model_factories import build_sana, save_pipeline

    base = tmp_path_factory.mktemp("comfy")
    model = save_pipeline(build_sana(seed=0, with_vae=False, sample_size=8), tmp_path_factory.mktemp("m") / MODEL)
    srv = ComfyServer(base)
    srv.add_model("diffusers", MODEL, model)
    yield srv
    srv.close()


def _graph(recipe: Recipe, per_queue: int) -> tuple[dict, dict[str, str]]:
    """The API graph of a training recipe with Loop Start set to `per_queue`; and class -> node id."""
    api = training_graph(recipe)
    ids = {node["class_type"]: nid for nid, node in api.items()}
    api[ids["SolRLLoopStart"]]["inputs"]["iterations"] = per_queue
    return api, ids


def _rows(server, run_name):
    path = server.output_dir / "solrl_runs" / run_name / "metrics.jsonl"
    if not path.exists():
        return []
    # Complete lines only: the file may be read while ComfyUI appends a row.
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]]


def _no_time(row):
    return {k: v for k, v in row.items() if not k.startswith("time_")}


def _image(server, entry) -> Image.Image:
    img = Image.open(io.BytesIO(server.view(entry)))
    img.load()
    return img


@live
def test_every_op_is_listed(server):
    info = server.get("/object_info")
    missing = [op for op in all_ops() if op not in info]
    assert missing == []
    assert info["SolRLLoopStart"]["category"] == "Sol-RL/flow"
    # Load Policy's model list is ComfyUI's model folders: the fixture placed in models/diffusers is there.
    choices = info["SolRLLoadPolicy"]["input"]["required"]["model"][0]
    assert choices[0] == "embedded" and MODEL in choices


@live
def test_bundled_workflows_are_templates(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates["solrl"]) == sorted(BUNDLED)
    assert sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json")) == sorted(BUNDLED)
    served = server.get("/api/workflow_templates/solrl/quickstart.json")
    assert served == json.loads((WORKFLOWS_DIR / "quickstart.json").read_text())
    assert {n["type"] for n in served["nodes"]} >= {"SolRLTrainingRun", "SolRLLoopStart", "SolRLNFTUpdate"}


@live
def test_missing_reward_weights_are_refused_naming_comfyui_folders(server):
    """Validation (at POST /prompt, before any compute) looks for reward weights in models/solrl_rewards
    and ComfyUI's text encoder folders (models/text_encoders, models/clip)."""
    api, _ = _graph(replace(SMALL, reward="pickscore", run_name="refused"), 1)
    with pytest.raises(AssertionError, match="HTTP 400") as refused:
        server.submit(api)
    message = str(refused.value)
    assert "reward 'pickscore' needs" in message
    for folder in ("solrl_rewards", "text_encoders", "clip"):
        assert str(server.base / "models" / folder / "pickscore") in message, folder
    assert not (server.output_dir / "solrl_runs" / "refused").exists()


@live
def test_bundled_loop_runs_through_post_prompt(server):
    api, _ = load_workflow(WORKFLOWS_DIR / "demo_loop.json")
    history = server.queue(validate(api))
    kinds = message_types(history)
    assert "execution_success" in kinds and "execution_error" not in kinds, history["status"]
    final = next(v for k, v in history["outputs"].items() if k == "6")
    assert final["text"] == ["final_total = 15"]
    running = sorted(float(v["text"][0].split("= ")[1]) for k, v in history["outputs"].items() if k != "6")
    assert running == [1.5 * i for i in range(1, 11)]


@live
def test_training_queue_logs_rewards_and_continues(server):
    api, ids = _graph(SMALL, PER_QUEUE)
    first = server.queue(api)
    assert succeeded(first), first["status"]
    rows = _rows(server, "live")
    assert [r["iteration"] for r in rows] == [0, 1]
    for row in rows:
        for key in ROW_KEYS:
            assert isinstance(row[key], float) and row[key] == row[key], (key, row)  # logged, not NaN
        assert row["stepped"] == 1 and row["quant_backend"] == "emulated"

    # Preview (one grid per iteration) and Plot Metrics show real PNGs in the UI (temp/solrl).
    previews = ui_images(first, {ids["SolRLPreview"]})
    assert len(previews) == PER_QUEUE
    for entry in previews:
        assert entry["subfolder"] == "solrl" and entry["type"] == "temp"
        img = _image(server, entry)
        # 8x8 pixels x scale 4 per sample, K=2 samples per row, one row per prompt.
        assert img.format == "PNG" and img.mode == "RGB" and img.size[0] == 8 * 4 * SMALL.keep
        assert img.size[1] > 8 * 4 * SMALL.prompts_per_iteration
    saved = sorted((server.output_dir / "solrl_runs" / "live" / "previews").glob("*.png"))
    assert [p.name for p in saved] == ["iter-000000.png", "iter-000001.png"]
    shown = sorted(_image(server, e).tobytes() for e in previews)
    assert shown == sorted(Image.open(p).convert("RGB").tobytes() for p in saved)  # same pixels as the files
    (plot,) = ui_images(first, {ids["SolRLPlotMetrics"]})
    img = _image(server, plot)
    assert img.format == "PNG" and img.mode in ("RGB", "RGBA") and min(img.size) >= 200
    assert len(set(img.convert("L").getdata())) > 10  # a drawn plot, not a blank canvas
    lora_text = first["outputs"][ids["SolRLSaveLoRA"]]["text"]
    assert lora_text[0].endswith("live_lora.safetensors")

    # Queue the same workflow again: mode "continue" goes on at the third iteration.
    second = server.queue(api)
    assert succeeded(second), second["status"]
    rows = _rows(server, "live")
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert all(r["stepped"] == 1 and r["reward_mean"] == r["reward_mean"] for r in rows)
    assert len(ui_images(second, {ids["SolRLPreview"]})) == PER_QUEUE


@live
def test_interrupt_leaves_a_run_that_resumes(server):
    """POST /interrupt mid-iteration; queueing again continues from the last committed iteration, and
    the rows equal those of the uninterrupted run above (same seed and settings, another run name)."""
    recipe = replace(SMALL, run_name="interrupted")
    api, _ = _graph(recipe, 4)
    committed = _interrupt_after_first_commit(server, api, "interrupted")
    run_dir = server.output_dir / "solrl_runs" / "interrupted"
    assert (run_dir / "checkpoints" / "latest").exists()

    api, _ = _graph(recipe, 4 - committed)  # only the Loop Start count changes: the run is the same
    resumed = server.queue(api)
    assert succeeded(resumed), resumed["status"]
    rows = _rows(server, "interrupted")
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    reference = _rows(server, "live")  # 4 uninterrupted iterations (two queues of 2)
    assert len(reference) == 4
    assert [_no_time(r) for r in rows[:4]] == [_no_time(r) for r in reference]


def test_headless_preview_and_plot_outputs_are_valid_images(tmp_path):
    """Without ComfyUI: Preview's and Plot Metrics' IMAGE outputs are ComfyUI images ([1, H, W, 3] floats
    in [0, 1]) equal to the PNG files they write to the run directory."""
    from model_factories import build_sana, save_pipeline

    from solrl_core.graph.executor import execute
    from solrl_core.runtime.context import RunContext

    folder = save_pipeline(build_sana(seed=0, with_vae=False, sample_size=8), tmp_path / "model")
    api, ids = _graph(replace(SMALL, model=str(folder), iterations=1), 1)
    run_dir = tmp_path / "run"
    result = execute(api, RunContext(run_dir=run_dir))
    _, preview = result.outputs[ids["SolRLPreview"]]
    (plot,) = result.outputs[ids["SolRLPlotMetrics"]]
    files = {"preview": run_dir / "previews" / "iter-000000.png", "plot": run_dir / "reward_mean.png"}
    for kind, image in (("preview", preview), ("plot", plot)):
        assert image.dtype == torch.float32 and image.dim() == 4 and image.shape[0] == 1 and image.shape[3] == 3
        assert 0.0 <= image.min().item() and image.max().item() <= 1.0
        png = Image.open(files[kind])
        assert png.format == "PNG" and png.mode in ("RGB", "RGBA")
        pixels = torch.from_numpy(np.asarray(png.convert("RGB"), dtype=np.float32) / 255.0)
        assert torch.equal(image[0], pixels), kind
        assert str(files[kind]) in result.ui[ids["SolRLPreview" if kind == "preview" else "SolRLPlotMetrics"]]["text"]
    assert preview.shape[2] == 8 * 4 * SMALL.keep  # K samples of 8x8 pixels, scale 4
    assert preview.shape[1] > 8 * 4 * SMALL.prompts_per_iteration
    assert min(plot.shape[1:3]) >= 200 and plot.std().item() > 0.01  # a drawn plot, not a blank canvas


def _interrupt_after_first_commit(server, api, run_name) -> int:
    pid = server.submit(api)
    deadline = time.time() + 600
    while time.time() < deadline and len(_rows(server, run_name)) < 1:
        time.sleep(0.05)
    server.interrupt()  # lands in the iteration after the first commit
    history = server.wait(pid)
    kinds = message_types(history)
    assert "execution_interrupted" in kinds and "execution_success" not in kinds, history["status"]
    committed = len(_rows(server, run_name))
    assert 1 <= committed < 4, "the interrupt should land mid-queue"
    return committed


@live
def test_interrupted_run_resumes_in_a_restarted_comfyui(server):
    """The run directory alone is enough: a new ComfyUI process (same folders) continues the interrupted
    run from its checkpoint, with the rows an uninterrupted run has."""
    recipe = replace(SMALL, run_name="restarted")
    api, _ = _graph(recipe, 4)
    committed = _interrupt_after_first_commit(server, api, "restarted")
    fresh = ComfyServer(server.base)  # another process: nothing of the run is in its memory
    try:
        api, _ = _graph(recipe, 4 - committed)
        resumed = fresh.queue(api)
    finally:
        fresh.close()
    assert succeeded(resumed), resumed["status"]
    rows = _rows(server, "restarted")
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert [_no_time(r) for r in rows] == [_no_time(r) for r in _rows(server, "live")]
