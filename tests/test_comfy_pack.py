"""The ComfyUI pack: V1 contract of the generated classes, imports, bundled workflows in sync."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from solrl_core.bundled import BUNDLED, WORKFLOWS_DIR, render
from solrl_core.ops.registry import all_ops

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pack():
    """Import the repository root as a package, the way ComfyUI imports custom_nodes/<folder>."""
    spec = importlib.util.spec_from_file_location("solrl_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["solrl_pack"] = module
    spec.loader.exec_module(module)
    return module


def test_v1_contract(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == set(all_ops())
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(all_ops())
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("SolRL")
        types = cls.INPUT_TYPES()
        assert isinstance(types["required"], dict) and isinstance(types["optional"], dict)
        for section in ("required", "optional"):
            for name, entry in types[section].items():
                assert isinstance(entry, tuple) and len(entry) == 2, (node_id, name)
                assert isinstance(entry[0], (str, list)) and isinstance(entry[1], dict)
        assert isinstance(cls.RETURN_TYPES, tuple) and isinstance(cls.RETURN_NAMES, tuple)
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        assert callable(getattr(cls, cls.FUNCTION))
        assert cls.CATEGORY.startswith("Sol-RL")
        assert cls.DESCRIPTION


def test_generated_class_runs_op_and_expands(pack):
    start = pack.NODE_CLASS_MAPPINGS["SolRLLoopStart"]()
    end = pack.NODE_CLASS_MAPPINGS["SolRLLoopEnd"]()

    class FakeDynPrompt:  # ComfyUI's DynamicPrompt surface that loops use
        nodes = {"1": {"class_type": "SolRLLoopStart", "inputs": {"iterations": 3}},
                 "2": {"class_type": "SolRLMath", "inputs": {"a": ["1", 1]}},
                 "3": {"class_type": "SolRLLoopEnd", "inputs": {"flow": ["1", 0], "value": ["2", 0]}}}

        def get_node(self, nid):
            return self.nodes[nid]

        def get_display_node_id(self, nid):
            return nid

    flow, value, index = start.run(iterations=3, value=1.0, dynprompt=FakeDynPrompt(), unique_id="1")
    assert index == 0 and value == 1.0
    out = end.run(flow=flow, value=2.0, dynprompt=FakeDynPrompt(), unique_id="3")
    assert out["result"] == (["3.1.3", 0],)
    assert set(out["expand"]) == {"3.1.1", "3.1.2", "3.1.3"}
    assert out["expand"]["3.1.1"]["inputs"]["loop_state"] == {"index": 1}
    assert out["expand"]["3.1.2"]["inputs"]["a"] == ["3.1.1", 1]
    assert out["expand"]["3.1.2"]["override_display_id"] == "2"


def test_generated_classes_check_settings_and_widget_values(pack):
    """Nodes backed by settings (train/settings.py) refuse bad values in ComfyUI with one line, as the
    engine does."""
    update = pack.NODE_CLASS_MAPPINGS["SolRLNFTUpdate"]
    assert update.VALIDATE_INPUTS(samples=None, lr=3e-4, beta=0.5) is True
    assert update.VALIDATE_INPUTS(samples=None, lr=3e-4, beta=0.0) == "beta: 0 is below the minimum 0.001"
    ranker = pack.NODE_CLASS_MAPPINGS["SolRLProxyRewardRanker"]
    assert "K must be even" in ranker.VALIDATE_INPUTS(drafts=None, keep=3, mode="best_worst")
    assert ranker.VALIDATE_INPUTS(drafts=None, keep=3, mode="mean_deviation") is True
    assert "is not one of" in ranker.VALIDATE_INPUTS(drafts=None, keep=4, mode="worst")
    # A widget outside the settings is checked too (ComfyUI skips its own checks for such nodes).
    run = pack.NODE_CLASS_MAPPINGS["SolRLTrainingRun"]
    assert run.VALIDATE_INPUTS(mode="restart", seed=0) == "mode: 'restart' is not one of ['continue', 'new']"


def test_always_run_nodes_are_never_cached(pack):
    cls = pack.NODE_CLASS_MAPPINGS["SolRLLogMetric"]
    v = cls.IS_CHANGED()
    assert v != v  # NaN
    # A fresh object each call: ComfyUI compares cache keys by identity before equality.
    assert cls.IS_CHANGED() is not cls.IS_CHANGED()


def test_engine_never_imports_comfyui_and_uses_relative_imports():
    code = "import sys, solrl_core.run, solrl_core.ops.registry as r; r.all_ops(); " \
           "print(any(m.split('.')[0] in ('comfy', 'folder_paths', 'nodes', 'server') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr
    # Inside ComfyUI the pack is imported as a package, so absolute `solrl_core` imports would load
    # a second copy of the engine: everything inside the pack imports relatively.
    absolute = re.compile(r"^\s*(from|import)\s+solrl_core\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for folder in ("solrl_core", "nodes")
                 for p in (ROOT / folder).rglob("*.py") if absolute.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_bundled_workflows_are_in_sync():
    for name in BUNDLED:
        path = WORKFLOWS_DIR / f"{name}.json"
        assert path.exists(), f"run `python -m solrl_core.bundled` to write {path.name}"
        assert path.read_text(encoding="utf-8") == render(name), f"{path.name} is stale: run python -m solrl_core.bundled"
