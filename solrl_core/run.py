"""Headless entry point: ``python -m solrl_core.run WORKFLOW.json [options]``.

Runs a ComfyUI workflow file (API or UI format) with no ComfyUI installed. Exit codes: 0 done,
1 a node failed, 2 the workflow or command line is invalid (nothing was written), 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .graph.errors import WorkflowError
from .graph.executor import NodeError, execute
from .graph.rundir import default_run_dir, write_run_header
from .graph.validate import validate
from .graph.workflow import ApiGraph, api_to_ui, dump_json, load_workflow
from .ops.registry import all_ops
from .runtime import distributed as dp
from .runtime.context import Interrupted, RunContext, use_context
from .runtime.files import check_writable

log = logging.getLogger("solrl")


class CliContext(RunContext):
    """tqdm progress: one bar for loop iterations, a status line for the current node."""

    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self._loop_bar: tqdm | None = None
        self._status = tqdm(total=0, bar_format="{desc}", position=1, leave=False, dynamic_ncols=True)

    def on_loop_iteration(self, loop_id: str, index: int, total: int) -> None:
        if self._loop_bar is None or self._loop_bar.total != total:
            if self._loop_bar is not None:
                self._loop_bar.close()
            self._loop_bar = tqdm(total=total, desc=f"loop {loop_id}", position=0, unit="it", dynamic_ncols=True)
        self._loop_bar.n = index
        self._loop_bar.refresh()

    def on_node_start(self, node_id: str, title: str) -> None:
        self._status.set_description_str(f"  node {node_id}: {title}")

    def progress(self, total: int, desc: str = ""):
        return _TqdmBar(total, desc)

    def status(self, text: str) -> None:
        log.info(text)
        tqdm.write(text)

    def close(self) -> None:
        if self._loop_bar is not None:
            self._loop_bar.n = self._loop_bar.total
            self._loop_bar.close()
        self._status.close()


class QuietContext(RunContext):
    """Processes other than 0: no progress bars, no console output."""

    def close(self) -> None:
        pass


class _TqdmBar:
    def __init__(self, total: int, desc: str):
        self.bar = tqdm(total=total, desc=desc, position=2, leave=False, dynamic_ncols=True)

    def update(self, done: int, total: int | None = None, preview: Any = None) -> None:
        if total is not None:
            self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def parse_value(text: str) -> Any:
    """`--set` values are JSON when they parse as JSON (numbers, true/false, lists), else strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(api: ApiGraph, overrides: list[str], source: str) -> None:
    for item in overrides:
        target, eq, value = item.partition("=")
        node_ref, dot, input_name = target.rpartition(".")
        if not eq or not dot or not node_ref or not input_name:
            raise WorkflowError(f"--set {item!r}: expected NODE.INPUT=VALUE (NODE is an id or a title)",
                                source=source)
        matches = [nid for nid, e in api.items()
                   if nid == node_ref or (e.get("_meta") or {}).get("title") == node_ref]
        if not matches:
            raise WorkflowError(f"--set {item!r}: no node has id or title {node_ref!r}", source=source)
        if len(matches) > 1:
            raise WorkflowError(f"--set {item!r}: title {node_ref!r} matches nodes {', '.join(matches)}; "
                                "use the id", source=source)
        api[matches[0]].setdefault("inputs", {})[input_name] = parse_value(value)


def list_nodes() -> str:
    lines = []
    for spec in sorted(all_ops().values(), key=lambda s: (s.category, s.id)):
        ins = ", ".join(f"{i.name}:{i.type}" for i in spec.inputs)
        outs = ", ".join(f"{o.name}:{o.type}" for o in spec.outputs)
        lines.append(f"{spec.id:28s} {spec.category:22s} ({ins}) -> ({outs})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m solrl_core.run", description=__doc__.splitlines()[0])
    p.add_argument("workflow", nargs="?", help="workflow JSON file (ComfyUI API or UI format)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override an input; NODE is a node id or title (repeatable)")
    p.add_argument("--run-dir", type=Path, help="run directory (default runs/<name>-<time>); an existing "
                   "one is resumed")
    p.add_argument("--validate-only", action="store_true", help="check the workflow and exit")
    p.add_argument("--list-nodes", action="store_true", help="list the known node types and exit")
    p.add_argument("--to-api", type=Path, metavar="OUT", help="write the workflow in API format and exit")
    p.add_argument("--to-ui", type=Path, metavar="OUT", help="write the workflow in UI format and exit")
    p.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (fix it for bit-reproducible runs)")
    p.add_argument("--plan", action="store_true", help="print the peak accelerator memory of one iteration by "
                   "component and the explorer's layers, loading no weights (configs suffice), and exit")
    p.add_argument("--gpu-memory", type=float, metavar="GIB", help="with --plan: the device memory to fit in (GiB)")
    p.add_argument("--world-size", type=int, metavar="N", help="with --plan: ranks sharing the prompts "
                   "(default $WORLD_SIZE or 1)")
    p.add_argument("--json", action="store_true", help="with --plan: one JSON object")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.plan and (args.gpu_memory is not None or args.json or args.world_size is not None):
        parser.error("--gpu-memory, --world-size and --json go with --plan")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s")
    for h in logging.getLogger().handlers:  # the console shows warnings; status lines go through tqdm
        h.setLevel(logging.DEBUG if args.debug else logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.list_nodes:
        print(list_nodes())
        return 0
    if not args.workflow:
        print("error: give a workflow file (or --list-nodes)", file=sys.stderr)
        return 2
    try:
        api, _ = load_workflow(args.workflow)
        apply_overrides(api, args.overrides, args.workflow)
        if args.plan:
            from .plan.workflow import run_plan

            return run_plan(api, args.workflow, args.gpu_memory, args.json, args.world_size)
        graph = validate(api, args.workflow)
        if args.to_api or args.to_ui:
            for out, data in ((args.to_api, graph), (args.to_ui, api_to_ui(graph) if args.to_ui else None)):
                if out:
                    out.write_text(dump_json(data), encoding="utf-8")
            return 0
        if args.validate_only:
            print(f"{args.workflow}: ok ({len(graph)} nodes)")
            return 0
        run_dir = args.run_dir or default_run_dir(args.workflow)
        check_writable(run_dir)
    except (WorkflowError, PermissionError, OSError, ValueError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _execute(graph, args, run_dir, argv)


def _execute(graph: ApiGraph, args: argparse.Namespace, run_dir: Path, argv: list[str]) -> int:
    # Under torchrun every process runs the workflow on its share of the prompts; process 0 owns the files.
    dp.init_from_env()
    run_dir = Path(dp.broadcast(str(run_dir)))
    main_rank = dp.is_main()
    if main_rank:
        write_run_header(run_dir, graph, args.workflow, ["python", "-m", "solrl_core.run", *argv])
    dp.barrier()
    handler: logging.Handler = (logging.FileHandler(run_dir / "run.log", encoding="utf-8") if main_rank
                                else logging.NullHandler())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if args.debug else logging.INFO)
    ctx = CliContext(run_dir=run_dir) if main_rank else QuietContext(run_dir=run_dir)

    def on_sigint(signum: int, frame: Any) -> None:  # stop at the next node boundary / safe point
        if ctx.interrupt_event.is_set():
            raise KeyboardInterrupt
        ctx.interrupt_event.set()
        tqdm.write("stopping at the next safe point (Ctrl-C again to abort now)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    log.info("run directory: %s", run_dir)
    try:
        with use_context(ctx):
            execute(graph, ctx)
        code = 0
    except Interrupted:
        log.warning("interrupted; the run directory is consistent and can be resumed with --run-dir %s", run_dir)
        code = 130
    except (NodeError, WorkflowError) as e:
        log.error("%s", e, exc_info=args.debug)
        print(f"error: {e}", file=sys.stderr)
        code = 1 if isinstance(e, NodeError) else 2
        if args.debug:
            raise
    finally:
        signal.signal(signal.SIGINT, previous)
        ctx.close()
        log.removeHandler(handler)
        handler.close()
    if dp.is_distributed():
        dp.destroy()
    if code == 0 and main_rank:
        print(f"done: {run_dir}")
    elif code == 130:
        print(f"interrupted: resume with --run-dir {run_dir}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
