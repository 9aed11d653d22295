"""Small graphs the engine tests share."""
from __future__ import annotations


def sum_loop(iterations: int, step: float = 1.5) -> dict:
    """Loop adding `step` each iteration and logging the running total; final total logged."""
    return {
        "1": {"class_type": "SolRLNumber", "inputs": {"value": 0.0}},
        "2": {"class_type": "SolRLLoopStart", "inputs": {"iterations": iterations, "value": ["1", 0]}},
        "3": {"class_type": "SolRLMath", "_meta": {"title": "Adder"},
              "inputs": {"a": ["2", 1], "b": step, "operation": "add"}},
        "4": {"class_type": "SolRLLogMetric", "inputs": {"name": "running", "value": ["3", 0], "step": ["2", 2]}},
        "5": {"class_type": "SolRLLoopEnd", "inputs": {"flow": ["2", 0], "value": ["4", 0]}},
        "6": {"class_type": "SolRLLogMetric", "_meta": {"title": "Final"}, "inputs": {"name": "final", "value": ["5", 0]}},
    }
