"""The metrics log: one writer of metrics.jsonl for the session and Log Metric, torn lines, resume."""
from __future__ import annotations

import json

from solrl_core.ops.utility import log_metric
from solrl_core.runtime.context import RunContext, use_context
from solrl_core.runtime.metrics import MetricsLog, metrics_log


class Recorder:
    """A sink that keeps what it was given."""

    def __init__(self):
        self.rows, self.images, self.closed = [], [], False

    def write(self, row):
        self.rows.append(row)

    def image(self, tag, image, step):
        self.images.append((tag, step))

    def close(self):
        self.closed = True


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_log_metric_and_session_rows_share_one_writer_and_its_sinks(tmp_path):
    log = metrics_log(tmp_path / "run")
    assert metrics_log(tmp_path / "run" / ".." / "run") is log  # one writer per directory
    sink = Recorder()
    log.add_sink(sink)
    with use_context(RunContext(run_dir=tmp_path / "run")):
        log_metric("marker", 2.5, step=3)
    log.append({"iteration": 0, "loss": 1.0})
    log.image("previews", object(), 0)
    expected = [{"metric": "marker", "value": 2.5, "step": 3}, {"iteration": 0, "loss": 1.0}]
    assert _lines(tmp_path / "run" / "metrics.jsonl") == expected
    assert sink.rows == expected and sink.images == [("previews", 0)]
    log.close()
    assert sink.closed and log.sinks == []


def test_restore_keeps_other_rows_drops_uncommitted_and_adds_missing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    marker = {"metric": "m", "value": 1.0}
    rows = [marker, {"iteration": 0, "loss": 0.5}, {"metric": "n", "value": 2.0}, {"iteration": 1, "loss": 0.4},
            {"iteration": 2, "loss": 0.3}]  # iteration 2 never reached its checkpoint
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    committed = [{"iteration": 0, "loss": 0.5}, {"iteration": 1, "loss": 0.4}]
    MetricsLog(tmp_path).restore(committed)
    assert _lines(path) == rows[:4]
    # Killed after the checkpoint of iteration 2 but before its row was appended: the row is added.
    committed.append({"iteration": 2, "loss": 0.3})
    MetricsLog(tmp_path).restore(committed)
    assert _lines(path) == rows
    MetricsLog(tmp_path).restore([])  # a new run in the same folder: no iteration rows, others stay
    assert _lines(path) == [marker, {"metric": "n", "value": 2.0}]


def test_a_torn_last_line_is_not_a_row_and_the_next_append_cuts_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 0}\n{"iteration": 1, "lo')  # killed in the middle of a write
    log = MetricsLog(tmp_path)
    assert log.rows() == [{"iteration": 0}]
    log.append({"iteration": 1, "loss": 0.2})
    assert path.read_text() == '{"iteration": 0}\n{"iteration": 1, "loss": 0.2}\n'
    path.write_text('{"iteration": 0}\n{"iter')
    MetricsLog(tmp_path).restore([{"iteration": 0}])  # restore also leaves whole lines only
    assert path.read_text() == '{"iteration": 0}\n'
