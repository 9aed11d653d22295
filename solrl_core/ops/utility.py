"""Small general-purpose nodes: arithmetic on loop values and metric logging."""
from __future__ import annotations

import math
import operator

from ..runtime.context import current_context
from .registry import register
from .spec import Input, OpSpec, Output

_MATH = {
    "add": operator.add,
    "subtract": operator.sub,
    "multiply": operator.mul,
    "divide": operator.truediv,
    "max": max,
    "min": min,
    "power": operator.pow,
}


def math_op(a: float, b: float, operation: str) -> tuple[float]:
    try:
        result = float(_MATH[operation](a, b))
    except ZeroDivisionError:
        result = math.nan
    return (result,)


def log_metric(name: str, value: float, step: int = -1) -> dict:
    row = {"metric": name, "value": value}
    if step >= 0:
        row["step"] = step
    ctx = current_context()
    if ctx.run_dir is not None:
        ctx.log_metrics(row)
    ctx.status(f"{name} = {value:g}")
    return {"ui": {"text": [f"{name} = {value:g}"]}, "result": (value,)}


def number(value: float) -> tuple[float]:
    return (value,)


NUMBER = register(OpSpec(
    id="SolRLNumber",
    display_name="Number",
    category="Sol-RL/utility",
    description="A constant number (e.g. a loop's initial value).",
    inputs=(Input("value", "FLOAT", 0.0, min=-1e12, max=1e12, step=0.01),),
    outputs=(Output("value", "FLOAT"),),
    function=number,
))

MATH = register(OpSpec(
    id="SolRLMath",
    display_name="Math",
    category="Sol-RL/utility",
    description="Arithmetic on two numbers (e.g. a loop counter).",
    inputs=(
        Input("a", "FLOAT", 0.0, min=-1e12, max=1e12, step=0.01),
        Input("b", "FLOAT", 0.0, min=-1e12, max=1e12, step=0.01),
        Input("operation", "COMBO", "add", choices=tuple(_MATH)),
    ),
    outputs=(Output("result", "FLOAT"),),
    function=math_op,
))

LOG_METRIC = register(OpSpec(
    id="SolRLLogMetric",
    display_name="Log Metric",
    category="Sol-RL/utility",
    description="Write a named value to the run's metrics.jsonl and show it.",
    inputs=(
        Input("name", "STRING", "value"),
        Input("value", "FLOAT", 0.0, min=-1e12, max=1e12),
        Input("step", "INT", -1, min=-1, max=1 << 31, tooltip="Iteration to log it under (-1: none)."),
    ),
    outputs=(Output("value", "FLOAT"),),
    function=log_metric,
    output_node=True,
    always_run=True,
))
