"""Declarative settings: every dataclass field states its type and constraint; one function checks them all.

Model configurations and recipe sections are dataclasses whose fields carry a `Constraint` in their metadata
(`setting(default, check=...)`) and whose class may list cross-field `RULES` (small named functions). `check`
coerces each value to its type hint, tests its constraint and runs the rules, and every failure is one
`ConfigError` line that names the key, the value and what is allowed. There is no second validation idiom.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, fields
from typing import Any, Union, get_args, get_origin, get_type_hints

# The one spelling of a device setting, shared by the CLI flags, recipes and device resolution.
DEVICE_PATTERN = r"auto|cpu|cuda(?::(\d+))?"  # group 1: the CUDA index
DEVICE_ALLOWED = "auto, cpu, cuda or cuda:N"


class ConfigError(ValueError):
    """An invalid configuration value: the message names the field, the value and what is allowed."""


@dataclass(frozen=True)
class Constraint:
    """What a value must satisfy, with the words that say so in an error message."""

    allowed: str
    test: Callable[[Any], bool]


def at_least(low: float, allowed: str) -> Constraint:
    return Constraint(allowed, lambda v: v >= low)


def above(low: float, allowed: str) -> Constraint:
    return Constraint(allowed, lambda v: v > low)


POSITIVE = above(0, "a positive number")
POSITIVE_INT = above(0, "a positive integer")
NON_NEGATIVE = at_least(0, "a non-negative number")
NON_NEGATIVE_INT = at_least(0, "a non-negative integer")


def interval(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Constraint:
    """low <= v <= high, with either end open; the message writes it as [low, high) and so on."""
    text = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def test(v: float) -> bool:
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return Constraint(text, test)


def one_of(*choices: Any) -> Constraint:
    return Constraint(f"one of {list(choices)}", lambda v: v in choices)


def matches(pattern: str, allowed: str) -> Constraint:
    compiled = re.compile(pattern)
    return Constraint(allowed, lambda v: compiled.fullmatch(v) is not None)


def non_empty(allowed: str) -> Constraint:
    return Constraint(allowed, lambda v: len(v) > 0)


DEVICE = matches(DEVICE_PATTERN, DEVICE_ALLOWED)


def setting(
    default: Any = MISSING,
    *,
    check: Constraint | None = None,
    factory: Callable[[], Any] | None = None,
    **metadata: Any,
) -> Any:
    """A dataclass field with its constraint in the metadata (None values skip the constraint: a field that
    may be null says so in its type hint)."""
    meta = {"check": check, **metadata}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Violation:
    """A broken cross-field rule: the key to name, its value and what is allowed."""

    key: str
    value: Any
    allowed: str


Rule = Callable[[Any], "Violation | None"]


@functools.cache
def field_hints(cls: type) -> dict[str, Any]:
    """The evaluated type hint of each dataclass field (class variables such as RULES left out)."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"invalid {key}={value!r}: must be {allowed}")


def check(obj: Any, prefix: str = "") -> None:
    """Coerce every field of the dataclass `obj` to its type, test its constraint, then the class's RULES.

    Rules see the coerced values; a rule's key is relative to `prefix` (the section name in a recipe).
    """
    hints = field_hints(type(obj))
    for f in fields(obj):
        key = prefix + f.name
        value = coerce_value(key, getattr(obj, f.name), hints[f.name])
        object.__setattr__(obj, f.name, value)
        constraint = f.metadata.get("check")
        if constraint is not None and value is not None and not constraint.test(value):
            fail(key, value, constraint.allowed)
    for rule in getattr(type(obj), "RULES", ()):
        broken = rule(obj)
        if broken is not None:
            fail(prefix + broken.key, broken.value, broken.allowed)


def constraints(cls: type) -> Iterator[tuple[str, Any, Constraint | None]]:
    """(field name, type hint, constraint) of every field: what tests and documentation enumerate."""
    hints = field_hints(cls)
    for f in fields(cls):
        yield f.name, hints[f.name], f.metadata.get("check")


def type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Any: "any value"}
    if hint in names:
        return names[hint]
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is list:
        return f"a list of {type_name(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} fields"
    return getattr(hint, "__name__", str(hint))


def coerce_value(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against a field's type hint, naming `key` when it does not fit.

    Integers given as integral floats (`1e2`) become ints and ints become floats where a float is expected;
    fractions for integer fields, strings for numbers, numbers for strings and so on are rejected up front, so a
    wrong type never reaches the code that would crash on it.
    """
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return coerce_value(key, value, option)
            except ConfigError as error:
                errors.append(error)
        if len(options) == 1 and errors:  # Optional[X]: X's own message is the precise one
            raise errors[0]
        fail(key, value, type_name(hint))
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, float):
            fail(key, value, "an integer (no fraction)")
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                fail(key, value, "a finite number")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list or origin is tuple:
        if isinstance(value, (list, tuple)):
            item = args[0] if args else Any
            coerced = [coerce_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
            return tuple(coerced) if origin is tuple else coerced
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            item_hint = args[1] if len(args) == 2 else Any
            return {k: coerce_value(f"{key}.{k}", v, item_hint) for k, v in value.items()}
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            check(value, f"{key}.")
            return value
        if isinstance(value, dict):
            return build(hint, value, f"{key}.")
    else:
        return value
    fail(key, value, type_name(hint))


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """An instance of the dataclass `cls` from a mapping, naming unknown keys and checking every value."""
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key(s) {[prefix + k for k in unknown]}; allowed: {sorted(allowed)}")
    hints = field_hints(cls)
    coerced = {k: coerce_value(prefix + k, v, hints[k]) for k, v in values.items()}
    with keys_under(prefix):
        instance = cls(**coerced)  # a class that checks itself on construction names bare field names
    check(instance, prefix)
    return instance


@contextlib.contextmanager
def keys_under(prefix: str) -> Iterator[None]:
    """Re-raise a ConfigError raised inside with its key placed under `prefix` (model. -> model.vocab_size)."""
    try:
        yield
    except ConfigError as error:
        message = str(error)
        if prefix and message.startswith("invalid ") and not message.startswith(f"invalid {prefix}"):
            raise ConfigError(f"invalid {prefix}{message.removeprefix('invalid ')}") from None
        raise


def coerce_fields(cls: type, values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`values` (a mapping of a dataclass's fields) with every value checked and coerced to its field's type."""
    hints = field_hints(cls)
    return {
        name: coerce_value(prefix + name, value, hints[name]) if name in hints else value
        for name, value in values.items()
    }


def to_plain(value: Any) -> Any:
    """Dataclasses, tuples and containers as plain YAML/JSON values (what a recipe file would hold)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if hasattr(value, "to_mapping"):
            return value.to_mapping()
        return {f.name: to_plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value
