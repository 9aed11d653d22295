"""The workflows shipped in workflows/, defined in code so they never drift from the op specs.

`python -m solrl_core.bundled` rewrites workflows/*.json (UI format, so ComfyUI lists them as
templates); a test checks the files equal what this module generates.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .graph.builder import GraphBuilder
from .graph.workflow import ApiGraph, api_to_ui, dump_json

WORKFLOWS_DIR = Path(__file__).resolve().parent.parent / "workflows"


@dataclass(frozen=True)
class Bundled:
    name: str
    note: str  # shown in a Note node: what it does and what to set
    build: Callable[[], ApiGraph]


def demo_loop() -> ApiGraph:
    b = GraphBuilder()
    zero = b.add("SolRLNumber", "Initial total", value=0.0)
    start = b.add("SolRLLoopStart", "Loop Start", iterations=10, value=zero.out("value"))
    add = b.add("SolRLMath", "Add 1.5", a=start.out("value"), b=1.5, operation="add")
    logged = b.add("SolRLLogMetric", "Log running total", name="running_total", value=add.out("result"),
                   step=start.out("index"))
    end = b.add("SolRLLoopEnd", "Loop End", flow=start.out("flow"), value=logged.out("value"))
    b.add("SolRLLogMetric", "Log final total", name="final_total", value=end.out("value"))
    return b.graph


BUNDLED: dict[str, Bundled] = {
    w.name: w for w in (
        Bundled("demo_loop", "A loop of trivial nodes: adds 1.5 ten times and logs the running total. "
                "Shows how Loop Start / Loop End repeat the nodes between them.", demo_loop),
    )
}


def render(name: str) -> str:
    w = BUNDLED[name]
    return dump_json(api_to_ui(w.build(), notes={f"About: {name}": w.note}))


def write_all(folder: Path = WORKFLOWS_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in BUNDLED:
        path = folder / f"{name}.json"
        path.write_text(render(name), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else WORKFLOWS_DIR):
        print(p)
