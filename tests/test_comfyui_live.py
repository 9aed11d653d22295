"""The pack inside a real ComfyUI, started headless on CPU (skipped without COMFYUI_PATH)."""
import pytest
from comfyui_server import ComfyServer, message_types

from solrl_core.bundled import WORKFLOWS_DIR
from solrl_core.graph.validate import validate
from solrl_core.graph.workflow import load_workflow
from solrl_core.ops.registry import all_ops

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ComfyServer(tmp_path_factory.mktemp("comfy"))
    yield srv
    srv.close()


def test_every_op_is_listed(server):
    info = server.get("/object_info")
    missing = [op for op in all_ops() if op not in info]
    assert missing == []
    assert info["SolRLLoopStart"]["category"] == "Sol-RL/flow"


def test_bundled_loop_runs_through_post_prompt(server):
    api, _ = load_workflow(WORKFLOWS_DIR / "demo_loop.json")
    history = server.queue(validate(api))
    kinds = message_types(history)
    assert "execution_success" in kinds and "execution_error" not in kinds, history["status"]
    final = next(v for k, v in history["outputs"].items() if k == "6")
    assert final["text"] == ["final_total = 15"]
    running = sorted(float(v["text"][0].split("= ")[1]) for k, v in history["outputs"].items() if k != "6")
    assert running == [1.5 * i for i in range(1, 11)]
