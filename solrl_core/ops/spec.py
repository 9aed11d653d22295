"""Declarative op specs: the single definition each node is generated from.

An `OpSpec` is read by the headless engine (validation, execution), by the ComfyUI adapter
(`nodes/` generates INPUT_TYPES, RETURN_TYPES, ... from it) and by the UI-format converter (the
positional `widgets_values` of a node are mapped to input names in spec order).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from ..runtime.settings import Bounds, SettingError, bounds_of, check_value, default_of, kind_of

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
        bounds = Bounds(self.min, self.max, choices=self.choices)
        try:
            return check_value(value, _KINDS[self.type], bounds, open_choices=bool(self.choices_from))
        except ValueError as e:
            raise InputError(self.name, str(e)) from None

    @classmethod
    def of(cls, settings: type, name: str, **overrides: Any) -> Input:
        """The input for field `name` of a settings class: its type, default, bounds and help as declared
        there (runtime.settings), so the node and the Python API cannot drift apart."""
        b, kind = bounds_of(settings, name), kind_of(settings, name)
        type_ = {int: "INT", float: "FLOAT", bool: "BOOLEAN"}.get(kind) or ("COMBO" if b.choices else "STRING")
        spec = dict(default=default_of(settings, name), min=b.min, max=b.max, step=b.step, choices=b.choices,
                    tooltip=b.help)
        return cls(name, type_, **{**spec, **overrides})


_KINDS = {"INT": int, "FLOAT": float, "BOOLEAN": bool, "STRING": str, "COMBO": str}


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
    # The settings class (runtime.settings) its widget inputs build: built from the literal inputs at
    # validation, so its bounds and cross-field rules refuse a workflow before any compute.
    settings: type | None = None

    def input(self, name: str) -> Input | None:
        return next((i for i in self.inputs if i.name == name), None)

    def check(self, literals: dict[str, Any], linked: dict[str, dict[str, Any]]) -> None:
        """Checks across inputs, before compute: the settings (with defaults for inputs that are
        linked or absent), then the `validate` hook. Raises InputError (or ValueError /
        FileNotFoundError from the hook)."""
        if self.settings is not None:
            names = {f.name for f in fields(self.settings)}
            try:
                self.settings(**{k: v for k, v in literals.items() if k in names})
            except SettingError as e:
                raise InputError(e.name, e.detail) from None
        if self.validate is not None:
            self.validate(literals, linked)

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
