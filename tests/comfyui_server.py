"""Start a real ComfyUI (headless, CPU) with this pack installed, for conformance tests.

Skips unless COMFYUI_PATH points at a ComfyUI checkout; COMFYUI_PYTHON picks the interpreter
that has ComfyUI's requirements (default: this one).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base: Path):
        comfy = os.environ.get("COMFYUI_PATH")
        if not comfy:
            pytest.skip("COMFYUI_PATH is not set")
        self.base = base
        (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        pack = base / "custom_nodes" / "solrl"
        if not pack.is_symlink():  # a second server on the same base directory reuses the link
            pack.symlink_to(ROOT, target_is_directory=True)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        python = os.environ.get("COMFYUI_PYTHON", sys.executable)
        self.log = open(base / f"comfyui-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(base), "--disable-auto-launch"],
            cwd=comfy, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited: see {self.log.name}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        raise TimeoutError("ComfyUI did not start in 180 s")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.load(r)

    def post(self, path: str, payload: dict | None = None):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload or {}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
        except urllib.error.HTTPError as e:  # ComfyUI explains a refused prompt in the body
            raise AssertionError(f"POST {path}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None
        return json.loads(body) if body else None

    def submit(self, api: dict) -> str:
        """POST a prompt (API format); returns its prompt id without waiting."""
        return self.post("/prompt", {"prompt": api})["prompt_id"]

    def queue(self, api: dict, timeout: float = 600) -> dict:
        """POST a prompt and wait for its history entry."""
        return self.wait(self.submit(api), timeout)

    def wait(self, pid: str, timeout: float = 600) -> dict:
        """The history entry of prompt `pid` once it finished (success, error or interrupted)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                return hist[pid]
            time.sleep(0.5)
        raise TimeoutError(f"prompt {pid} did not finish in {timeout} s")

    def interrupt(self) -> None:
        self.post("/interrupt")

    def view(self, image: dict) -> bytes:
        """The bytes of an image a node showed in the UI ({"filename", "subfolder", "type"})."""
        query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=30) as r:
            return r.read()

    def add_model(self, kind: str, name: str, folder: Path) -> Path:
        """Make `folder` appear as models/<kind>/<name> (e.g. a diffusers pipeline folder)."""
        link = self.base / "models" / kind / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(folder).resolve(), target_is_directory=Path(folder).is_dir())
        return link

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def message_types(history: dict) -> list[str]:
    # status_str can say "success" after a runtime error: the messages tell the truth.
    return [m[0] for m in history["status"]["messages"]]


def succeeded(history: dict) -> bool:
    kinds = message_types(history)
    return "execution_success" in kinds and "execution_error" not in kinds and "execution_interrupted" not in kinds


def ui_images(history: dict, node_ids: set[str] | None = None) -> list[dict]:
    """The "images" ui entries of a finished prompt (of the given display node ids, or all)."""
    out = []
    for nid, ui in history["outputs"].items():
        if node_ids is None or nid.split(".")[-1] in node_ids:  # clones: <close>.<i>.<display id>
            out += ui.get("images", [])
    return out
