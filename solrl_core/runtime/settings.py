"""Validated settings: each field declares its default, bounds and help once.

A settings class is a frozen dataclass deriving from `Settings` whose fields are declared with
`setting(default, min=, max=, choices=, help=)`. Building one checks every field (type, bounds,
choices), then the class's `check()` (rules across fields), and raises a one-line `SettingError`
naming the class and the field. The node inputs of the engine are generated from the same fields,
so a node, a bundled recipe and a Python caller share one definition of every default and bound.
"""
from __future__ import annotations

import functools
import math
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

_KEY = "solrl_setting"


@dataclass(frozen=True)
class Bounds:
    """What a value may be: numbers within [min, max], strings among `choices` (when given)."""

    min: float | None = None
    max: float | None = None
    step: float | None = None  # the UI's increment; not a constraint
    choices: tuple[str, ...] = ()
    help: str = ""


class SettingError(ValueError):
    """A bad setting; `str(err)` is one line naming the settings class and the field."""

    def __init__(self, owner: str, name: str, message: str):
        super().__init__(f"{owner}.{name}: {message}")
        self.name, self.detail = name, message


def setting(default: Any, *, min: float | None = None, max: float | None = None, step: float | None = None,
            choices: tuple[str, ...] = (), help: str = "") -> Any:
    """A settings field with its default and what values it accepts."""
    return field(default=default, metadata={_KEY: Bounds(min, max, step, tuple(choices), help)})


def bounds_of(cls: type, name: str) -> Bounds:
    return next(f.metadata.get(_KEY, Bounds()) for f in fields(cls) if f.name == name)


def default_of(cls: type, name: str) -> Any:
    f = next(f for f in fields(cls) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def kind_of(cls: type, name: str) -> type:
    """The field's type among int, float, bool, str (anything else: object)."""
    hint = _hints(cls)[name]
    return hint if hint in (int, float, bool, str) else object


def check_value(value: Any, kind: type, b: Bounds, open_choices: bool = False) -> Any:
    """Check (and normalise) one value of `kind` (int, float, bool, str) against its bounds; raises
    ValueError with a one-line message. `open_choices`: any non-empty string is accepted as well."""
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected {'an integer' if kind is int else 'a number'}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value!r}")
        if b.min is not None and value < b.min:
            raise ValueError(f"{value:g} is below the minimum {b.min:g}")
        if b.max is not None and value > b.max:
            raise ValueError(f"{value:g} is above the maximum {b.max:g}")
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    if kind is str:
        if open_choices:
            if not isinstance(value, str) or not value:
                raise ValueError(f"expected a name or path, got {value!r}")
        elif b.choices and value not in b.choices:
            raise ValueError(f"{value!r} is not one of {list(b.choices)}")
        elif not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    """Base of the settings classes: fields are checked when built, then `check()` runs."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for f in fields(self):
            if _KEY not in f.metadata:
                continue
            try:
                value = check_value(getattr(self, f.name), kind_of(type(self), f.name), f.metadata[_KEY])
            except ValueError as e:
                raise SettingError(owner, f.name, str(e)) from None
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Rules across fields; raise `self.error(field, message)`."""

    def error(self, name: str, message: str) -> SettingError:
        return SettingError(type(self).__name__, name, message)
