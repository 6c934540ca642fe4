"""Dataclasses from plain data (a YAML mapping), validated by walking their type hints.

An unknown key, a wrong type, a bad choice or a missing field is a `RecipeError` naming its key
path: `optimizer.lr: expected a number, got str 'fast'`. Understood hints: the dataclasses
themselves, int, float, str, bool, Literal, list[X], tuple[X, ...] of fixed length, dict, unions
with None. A dataclass's `__post_init__` may raise RecipeError for rules the types cannot say.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Literal

from .errors import RecipeError

__all__ = ["parse_section", "to_dict"]


def parse_section(cls: type, data: Any, path: str) -> Any:
    """Build dataclass `cls` from `data`, checking keys and types; errors name `path.key`."""
    where = path or "the recipe"
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"{_join(path, unknown[0])}: unknown key; expected one of {sorted(known)}{hint}")
    values = {}
    for name, f in known.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecipeError(f"{_join(path, name)}: missing required field ({_describe(hints[name])})")
            continue
        values[name] = _coerce(hints[name], data[name], _join(path, name))
    try:
        return cls(**values)
    except RecipeError as err:  # a rule of __post_init__: its message starts with the field's name, or not
        message = str(err)
        field_name = re.match(r"[A-Za-z_]\w*", message)
        if field_name and field_name.group(0) in known and message[field_name.end() :][:1] in ":.[":
            raise RecipeError(_join(path, message)) from None
        raise RecipeError(f"{path + ': ' if path else ''}{message}") from None


def _coerce(kind: Any, value: Any, path: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, path)
            except RecipeError as err:
                errors.append(err)
        deeper = [e for e in errors if str(e).startswith((path + ".", path + "["))]  # the value had the right shape
        if deeper:
            raise deeper[0]
        raise RecipeError(f"{path}: expected {_describe(kind)}, got {_show(value)}")
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{path}: expected one of {list(args)}, got {_show(value)}")
        return value
    if dataclasses.is_dataclass(kind):
        return parse_section(kind, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{path}: expected a list, got {_show(value)}")
        return [_coerce(args[0], item, f"{path}[{i}]") for i, item in enumerate(value)] if args else list(value)
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise RecipeError(f"{path}: expected {_describe(kind)}, got {_show(value)}")
        return tuple(_coerce(a, item, f"{path}[{i}]") for i, (a, item) in enumerate(zip(args, value, strict=True)))
    if origin is dict or kind is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise RecipeError(f"{path}: expected a mapping with string keys, got {_show(value)}")
        _check_finite(value, path)  # free-form sections (kwargs, an inline augmentation) hold numbers too
        return dict(value)
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        _check_finite(value, path)
        return float(value)
    if kind in (int, str, bool) and isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise RecipeError(f"{path}: expected {_describe(kind)}, got {_show(value)}")


def _check_finite(value: Any, path: str) -> None:
    """Refuse nan and inf (YAML's `.nan`, `.inf`) anywhere in `value`: an lr or temperature of inf trains
    to nan weights without a word, so no float of a recipe may be non-finite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{path}: expected a finite number, got {value}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, _join(path, str(key)))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_finite(item, f"{path}[{i}]")


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is Literal:
        return "one of " + str(list(args))
    if dataclasses.is_dataclass(kind) or origin is dict or kind is dict:
        return "a mapping"
    if origin is list:
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is tuple:
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(kind, str(kind))


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, dict | list) else type(value).__name__


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def to_dict(obj: Any) -> Any:
    """A recipe (or section) back to plain YAML-able data."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
