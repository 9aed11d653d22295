"""Declarative op specs: the single definition each node is generated from.

An `OpSpec` is read by the headless engine (validation, execution), by the ComfyUI adapter
(`nodes/` generates INPUT_TYPES, RETURN_TYPES, ... from it) and by the UI-format converter (the
positional `widgets_values` of a node are mapped to input names in spec order).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
ANY = "*"


class InputError(ValueError):
    """A bad value for one input; the caller adds which node it belongs to."""

    def __init__(self, input_name: str, message: str):
        super().__init__(message)
        self.input_name = input_name


@dataclass(frozen=True)
class Input:
    name: str
    type: str  # a widget type (WIDGET_TYPES), ANY, or a socket type such as "SOLRL_POLICY" / "IMAGE"
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()
    tooltip: str = ""
    optional: bool = False
    multiline: bool = False
    seed: bool = False  # the UI adds a "control_after_generate" widget value after it
    # COMBO whose list the host extends (e.g. ComfyUI's model folders, by this folder kind); other
    # strings are accepted too (paths, repo ids) and checked by the op's validate hook.
    choices_from: str = ""

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES

    def check(self, value: Any) -> Any:
        """Validate (and normalise) a literal widget value; raises InputError naming the input."""
        name = self.name
        if self.type in ("INT", "FLOAT"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                kind = "an integer" if self.type == "INT" else "a number"
                raise InputError(name, f"expected {kind}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(name, f"expected a finite number, got {value!r}")
            if self.min is not None and value < self.min:
                raise InputError(name, f"{value:g} is below the minimum {self.min:g}")
            if self.max is not None and value > self.max:
                raise InputError(name, f"{value:g} is above the maximum {self.max:g}")
            if self.type == "INT":
                if isinstance(value, float) and not value.is_integer():
                    raise InputError(name, f"expected an integer, got {value!r}")
                return int(value)
            return float(value)
        if self.type == "BOOLEAN" and not isinstance(value, bool):
            raise InputError(name, f"expected true or false, got {value!r}")
        if self.type == "STRING" and not isinstance(value, str):
            raise InputError(name, f"expected a string, got {value!r}")
        if self.type == "COMBO" and self.choices_from:
            if not isinstance(value, str) or not value:
                raise InputError(name, f"expected a name or path, got {value!r}")
        elif self.type == "COMBO" and value not in self.choices:
            raise InputError(name, f"{value!r} is not one of {list(self.choices)}")
        return value


@dataclass(frozen=True)
class Output:
    name: str
    type: str
    tooltip: str = ""


@dataclass(frozen=True)
class OpSpec:
    """One node. `function(**inputs)` returns a tuple of outputs, or a dict with "result"
    (the tuple) and optionally "ui" and "expand" (a graph to run, ComfyUI's protocol)."""

    id: str  # node class id, prefixed "SolRL" so it never collides with a ComfyUI built-in
    display_name: str
    category: str  # "Sol-RL/..."
    description: str
    inputs: tuple[Input, ...]
    outputs: tuple[Output, ...]
    function: Callable[..., Any]
    output_node: bool = False  # a sink: it is run even when nothing consumes it
    always_run: bool = False  # never served from a cache (training steps, file writers)
    expands: bool = False  # receives the live graph (`graph`, `node_id`) to return an expansion
    # Creates or trains weights: hosts that run nodes in inference mode (ComfyUI) must lift it.
    trains: bool = False
    # Checks run at validation, before any compute: validate(literals, linked) gets this node's
    # literal inputs and, per linked input, the source node's literals plus its "class_type"
    # (empty inside ComfyUI, which validates node by node). Raises InputError naming the input.
    validate: Callable[[dict[str, Any], dict[str, dict[str, Any]]], None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def input(self, name: str) -> Input | None:
        return next((i for i in self.inputs if i.name == name), None)

    @property
    def widgets(self) -> tuple[Input, ...]:
        return tuple(i for i in self.inputs if i.is_widget)


def types_compatible(produced: str, expected: str) -> bool:
    if ANY in (produced, expected):
        return True
    # COMBO/STRING values can feed each other (ComfyUI lets a primitive STRING drive a combo).
    if {produced, expected} <= {"STRING", "COMBO"}:
        return True
    return produced == expected
