"""Packaging checks: ruff is clean and comfy-cli accepts the [tool.comfy] section."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (it is in the test extra)")
    return found


def test_ruff_clean():
    res = subprocess.run([_tool("ruff"), "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_comfy_node_validate(tmp_path):
    comfy = _tool("comfy")
    cmd = [comfy, "--skip-prompt", "--no-enable-telemetry", "node", "validate"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "passed" in out, out
    assert "Warning" not in out and "Security warnings" not in out, out
    # The check is real: a project without a version is refused.
    bad = (ROOT / "pyproject.toml").read_text().replace('version = "0.1.0"', 'version = ""', 1)
    (tmp_path / "pyproject.toml").write_text(bad)
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 or "passed" not in res.stdout + res.stderr


def test_requirements_txt_is_pyproject_without_torch():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    listed = [ln for ln in lines if ln and not ln.startswith("#")]
    assert listed == [d for d in deps if not d.startswith(("torch>", "torch=", "torchvision")) and d != "torch"]
