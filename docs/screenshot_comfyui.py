"""Re-take docs/comfyui_quickstart.png: the bundled quickstart workflow as ComfyUI's frontend draws it.

Starts ComfyUI headless on 127.0.0.1 with this pack installed (tests/comfyui_server.py), opens it in
headless Chromium through Playwright, loads workflows/quickstart.json with app.loadGraphData and
takes screenshots. Needs COMFYUI_PATH (a ComfyUI checkout), COMFYUI_PYTHON (its interpreter),
`pip install playwright` and a Chromium binary (CHROMIUM, or `chromium` on PATH); never `playwright install`.

    python docs/screenshot_comfyui.py
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from comfyui_server import ComfyServer  # noqa: E402

CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
# A fresh user: skip the first-run template browser and tutorial.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
            "Comfy.Workflow.ShowMissingNodesWarning": False, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}


def _chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise SystemExit("no Chromium found: install it (Debian: apt-get install chromium) or set CHROMIUM")
    return path


def shoot(workflow: Path, out: Path, detail: Path | None = None) -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        user = base / "user" / "default"
        user.mkdir(parents=True)
        (user / "comfy.settings.json").write_text(json.dumps(SETTINGS))
        server = ComfyServer(base)
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=_chromium(),
                                             args=CHROME_ARGS)
                page = browser.new_page(viewport={"width": 2600, "height": 760})
                page.goto(server.url, wait_until="load")
                page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)
                page.wait_for_timeout(2000)
                page.evaluate("async (wf) => { await window.app.loadGraphData(wf, true, true, 'quickstart'); }",
                              json.loads(workflow.read_text()))
                page.wait_for_timeout(1500)
                page.evaluate("() => { const c = window.app.canvas; c.ds.scale = 0.62; c.ds.offset = [20, 170];"
                              " c.setDirty(true, true); }")
                page.wait_for_timeout(1000)
                page.screenshot(path=str(out))
                if detail is not None:  # the loop body at full size
                    page.set_viewport_size({"width": 1900, "height": 600})
                    page.evaluate("() => { const c = window.app.canvas; c.ds.scale = 1.0; c.ds.offset = [-330, -40];"
                                  " c.setDirty(true, true); }")
                    page.wait_for_timeout(1000)
                    page.screenshot(path=str(detail))
                browser.close()
        finally:
            server.close()


if __name__ == "__main__":
    docs = ROOT / "docs"
    shoot(ROOT / "workflows" / "quickstart.json", docs / "comfyui_quickstart.png",
          docs / "comfyui_quickstart_loop.png")
    print(docs / "comfyui_quickstart.png")
