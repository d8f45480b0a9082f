"""Typed method configs: every field coerced once, here, from CLI strings, recipes and Python alike.

A config is a dataclass that subclasses `Config`. Its annotations are the contract:

    parts: list[Literal["ffn", "heads"]] = field(default_factory=lambda: ["ffn"])
    target: Budget = Budget.parse("params=0.8")      # any class with a `parse(str)` classmethod
    layers: dict[str, float] | None = None

`Config.__post_init__` turns what it was given into those types: "ffn,heads" -> ["ffn", "heads"], "0.5" ->
0.5, "true" -> True, "none" -> None, a YAML list stays a list with its items coerced, and a value outside
a `Literal` is an error that names the field, the allowed values and the closest one. Subclasses then
validate ranges in their own `__post_init__` after calling `super().__post_init__()`.

A config with many settings nests them in groups (fields whose type is itself a config dataclass), and
keeps the flat names users type in one table, `aliases` (flat name -> "group.field"):

    @dataclass(init=False)                 # Config.__init__ then takes flat, dotted and grouped settings
    class RecoverConfig(Config):
        aliases: ClassVar = {"lora_rank": "lora.rank", ...}
        lora: LoRAConfig = field(default_factory=LoRAConfig)

`RecoverConfig(lora_rank=8)`, `{lora.rank: 8}`, `{lora: {rank: 8}}` and `lora=LoRAConfig(rank=8)` are the
same config; a partial group is completed from the owner's default for it; `settings()` gives the flat
names back.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

__all__ = ["Config", "ConfigError", "coerce", "coerce_fields", "field_types", "plain", "setting_names", "settings"]


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
        if dataclasses.is_dataclass(annotation) and isinstance(value, Mapping):  # a group of settings
            return annotation(**coerce_fields(annotation, dict(value)))
        parse = getattr(annotation, "parse", None)
        if callable(parse) and isinstance(value, str):
            try:
                return parse(value)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{name}={value!r}: {e}") from None
        raise ConfigError(f"{name}={value!r}: expected {annotation.__name__}")
    return value


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"missing setting {f.name!r}")


def _is_group(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def _values(group: Any) -> dict[str, Any]:
    return {f.name: getattr(group, f.name) for f in dataclasses.fields(group) if f.init}


def _flat(cls: type) -> set[str]:
    """Fields listed under their flat names: the groups and the fields the alias table names."""
    return {path.partition(".")[0] for path in getattr(cls, "aliases", {}).values()}


def setting_names(cls: type) -> set[str]:
    """Every name a config accepts: its fields, their flat aliases and 'group.field' for its groups."""
    names = set(field_types(cls)) | set(getattr(cls, "aliases", {}))
    for name, annotation in field_types(cls).items():
        if _is_group(annotation):
            names |= {f"{name}.{sub}" for sub in field_types(annotation)}
    return names


def _nest(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Flat aliases and 'group.field' names gathered into their groups; a group given in part is completed
    from the field's default (so `lr=...` keeps the owner's own default `steps`)."""
    aliases = getattr(cls, "aliases", {})
    out: dict[str, Any] = {}
    inner: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        head, dot, rest = aliases.get(key, key).partition(".")
        if dot:
            inner.setdefault(head, {})[rest] = value
        else:
            out[head] = value
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        if not _is_group(types_.get(f.name)):
            continue
        given, more = out.get(f.name), inner.get(f.name, {})
        if isinstance(given, Mapping):  # a group in part (a recipe's nested form)
            given, more = None, {**given, **more}
        elif not more:
            continue  # absent (the default), or a whole group object
        out[f.name] = {**_values(_default(f) if given is None else given), **more}
    return out


def coerce_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Check names against the dataclass' fields ("did you mean") and coerce every value to its field's type.

    Flat aliases and 'group.field' names come back nested: {"lora_rank": 8} -> {"lora": LoRAConfig(rank=8)}."""
    known = field_types(cls)
    names = setting_names(cls)
    for key in values:
        if key not in names:
            listed = set(getattr(cls, "aliases", {})) | (set(known) - _flat(cls))  # the names users type
            first = {n for n in names if "." in n} if "." in key else listed  # (suggest in the form given)
            close = difflib.get_close_matches(key, first, n=3, cutoff=0.5) or \
                difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"{getattr(cls, 'name', cls.__name__)} has no setting {key!r}.{hint} "
                              f"Settings: {', '.join(sorted(listed))}")
    try:
        given = {key: value if _is_group(_annotation(cls, key)) else coerce(value, _annotation(cls, key), key)
                 for key, value in values.items()}  # (errors name the key as given; groups are completed first)
        return {key: coerce(value, known[key], key) for key, value in _nest(cls, given).items()}
    except ConfigError as e:
        raise ConfigError(f"{getattr(cls, 'name', cls.__name__)}: {e}") from None


def _annotation(cls: type, key: str) -> Any:
    """The type of setting `key`, a field, a flat alias or 'group.field'."""
    head, dot, rest = getattr(cls, "aliases", {}).get(key, key).partition(".")
    annotation = field_types(cls)[head]
    return field_types(annotation)[rest] if dot else annotation


class Config:
    """Base of every method config (a dataclass): fields are coerced to their annotated types on creation."""

    aliases: ClassVar[dict[str, str]] = {}  # flat name -> "group.field" (see the module docstring)

    def __init__(self, **settings: Any) -> None:
        """The constructor of `@dataclass(init=False)` configs: flat, dotted and grouped settings alike."""
        given = coerce_fields(type(self), settings)
        for f in dataclasses.fields(self):
            if f.init:
                object.__setattr__(self, f.name, given[f.name] if f.name in given else _default(f))
        self.__post_init__()

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
    """A config value as JSON / YAML can hold it: parsed types (a budget) as their text, groups as their
    settings, containers item by item."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if callable(getattr(type(value), "parse", None)):  # before the dataclass test: a budget is a dataclass too
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return settings(value)
    return value


def settings(config: Any) -> dict[str, Any]:
    """The public settings of a config dataclass (fields not starting with '_'), JSON-able. A config with an
    alias table lists those settings first, under their flat names, in the table's order."""
    if not dataclasses.is_dataclass(config):
        return {}
    out: dict[str, Any] = {}
    for flat, path in getattr(type(config), "aliases", {}).items():
        head, _, rest = path.partition(".")
        value = getattr(config, head)
        out[flat] = plain(getattr(value, rest) if rest else value)
    for f in dataclasses.fields(config):
        if f.init and not f.name.startswith("_") and f.name not in _flat(type(config)):
            out[f.name] = plain(getattr(config, f.name))
    return out
