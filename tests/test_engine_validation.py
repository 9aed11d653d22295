"""The malformed-workflow corpus: exit code 2, one line naming node and input, nothing written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from solrl_core.run import main

DATA = Path(__file__).parent / "data" / "malformed"
EXPECTED = json.loads((DATA / "expected.json").read_text(encoding="utf-8"))
ROOT = Path(__file__).resolve().parent.parent


def test_corpus_is_large_enough():
    assert len(EXPECTED) >= 25
    assert sorted(EXPECTED) == sorted(p.name for p in DATA.glob("*.json") if p.name != "expected.json")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_malformed_workflow_is_one_line_error(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    code = main([str(DATA / name), "--run-dir", str(run_dir)])
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and name in lines[0]
    for fragment in EXPECTED[name]:
        assert fragment in lines[0], (fragment, lines[0])
    assert not run_dir.exists() and list(tmp_path.iterdir()) == []


def test_cli_shows_no_traceback_and_debug_does(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = str(DATA / "type_mismatch.json")
    plain = subprocess.run([sys.executable, "-m", "solrl_core.run", bad], capture_output=True, text=True,
                           env=env, cwd=tmp_path)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1
    debug = subprocess.run([sys.executable, "-m", "solrl_core.run", bad, "--debug"], capture_output=True,
                           text=True, env=env, cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert not (tmp_path / "runs").exists()


def test_unwritable_run_dir_is_error_before_compute(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main([str(ROOT / "workflows" / "demo_loop.json"), "--run-dir", str(blocker / "run")])
    assert code == 2
    assert "not writable" in capsys.readouterr().err
