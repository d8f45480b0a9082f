"""Typed method configs: every field coerced once, here, from CLI strings, recipes and Python alike.

A config is a dataclass that subclasses `Config`. Its annotations are the contract:

    parts: list[Literal["ffn", "heads"]] = field(default_factory=lambda: ["ffn"])
    target: Budget = Budget.parse("params=0.8")      # any class with a `parse(str)` classmethod
    layers: dict[str, float] | None = None

`Config.__post_init__` turns what it was given into those types: "ffn,heads" -> ["ffn", "heads"], "0.5" ->
0.5, "true" -> True, "none" -> None, a YAML list stays a list with its items coerced, and a value outside
a `Literal` is an error that names the field, the allowed values and the closest one. Subclasses then
validate ranges in their own `__post_init__` after calling `super().__post_init__()`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

__all__ = ["Config", "ConfigError", "coerce", "coerce_fields", "field_types", "plain", "settings"]


class ConfigError(ValueError):
    """A setting of the wrong type or out of its allowed values; the message names the field and the fix."""


_HINTS: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass' init fields (cached per class)."""
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}
    return _HINTS[cls]


def _names(options: typing.Iterable[Any]) -> str:
    return ", ".join(repr(o) for o in options)


def _split(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):  # a JSON / YAML flow list given on the command line
        try:
            return list(json.loads(text))
        except (json.JSONDecodeError, TypeError):
            pass
    return [t.strip() for t in text.split(",") if t.strip()]


def coerce(value: Any, annotation: Any, name: str = "value") -> Any:
    """`value` as type `annotation`; strings are parsed, containers coerced item by item."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is Any or annotation is typing.Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null") and type(None) in args):
            if type(None) in args:
                return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for a in options:  # the first type that takes the value (order of the annotation)
            try:
                return coerce(value, a, name)
            except (ConfigError, ValueError, TypeError) as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}={value!r}: {'; or '.join(errors)}")
    if origin is Literal:
        if value in args:
            return value
        if isinstance(value, str):
            for a in args:  # numbers and booleans written as text
                if str(a).lower() == value.strip().lower():
                    return a
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{name}={value!r}: choose one of {_names(args)}.{hint}")
    if origin in (list, tuple, set, frozenset):
        items = _split(value) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple, set, frozenset)):
            raise ConfigError(f"{name}={value!r}: expected a list (comma-separated on the command line)")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ConfigError(f"{name}={value!r}: expected {len(args)} values")
            return tuple(coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(items, args)))
        item = args[0] if args else Any
        out = [coerce(v, item, f"{name}[{i}]") for i, v in enumerate(items)]
        return out if origin is list else origin(out)
    if origin is dict:
        if isinstance(value, str):
            try:
                import yaml

                value = yaml.safe_load(value)
            except Exception:  # noqa: BLE001  (yaml raises several error types; all mean the same here)
                raise ConfigError(f"{name}={value!r}: expected a mapping, e.g. {{'mlp.down': 0.3}}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={value!r}: expected a mapping, e.g. {{'mlp.down': 0.3}}")
        kt, vt = args if args else (Any, Any)
        return {coerce(k, kt, f"{name} key"): coerce(v, vt, f"{name}[{k!r}]") for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{name}={value!r}: expected true or false")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r}: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    f = None
                if f is not None and f.is_integer():
                    return int(f)
        raise ConfigError(f"{name}={value!r}: expected an integer")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r}: expected a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{name}={value!r}: expected a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}={value!r}: expected text")
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        parse = getattr(annotation, "parse", None)
        if callable(parse) and isinstance(value, str):
            try:
                return parse(value)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{name}={value!r}: {e}") from None
        raise ConfigError(f"{name}={value!r}: expected {annotation.__name__}")
    return value


def coerce_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Check names against the dataclass' fields ("did you mean") and coerce every value to its field's type."""
    known = field_types(cls)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"{getattr(cls, 'name', cls.__name__)} has no setting {key!r}.{hint} "
                              f"Settings: {', '.join(sorted(known))}")
        try:
            out[key] = coerce(value, known[key], key)
        except ConfigError as e:
            raise ConfigError(f"{getattr(cls, 'name', cls.__name__)}: {e}") from None
    return out


class Config:
    """Base of every method config (a dataclass): fields are coerced to their annotated types on creation."""

    def __post_init__(self) -> None:
        for key, annotation in field_types(type(self)).items():
            value = getattr(self, key)
            try:
                new = coerce(value, annotation, key)
            except ConfigError as e:
                raise ConfigError(f"{getattr(self, 'name', type(self).__name__)}: {e}") from None
            if new is not value:
                object.__setattr__(self, key, new)


def plain(value: Any) -> Any:
    """A config value as JSON / YAML can hold it: parsed types (a budget) as their text, containers item by item."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if callable(getattr(type(value), "parse", None)):
        return str(value)
    return value


def settings(config: Any) -> dict[str, Any]:
    """The public settings of a config dataclass (fields not starting with '_'), JSON-able."""
    if not dataclasses.is_dataclass(config):
        return {}
    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)
            if f.init and not f.name.startswith("_")}
