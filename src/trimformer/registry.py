"""Name -> method-class registries, one per family, with "did you mean" errors."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to config dataclasses (which are also the methods)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def deco(cls: type[T]) -> type[T]:
            if name in self._items:
                raise ValueError(f"{self.kind} method {name!r} is registered twice")
            self._items[name] = cls
            cls.name = name  # type: ignore[attr-defined]
            return cls

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def get(self, name: str) -> type[T]:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise KeyError(
                f"unknown {self.kind} method {name!r}.{hint} Available: {', '.join(self.names())}"
            ) from None

    def build(self, name: str, fields: Mapping[str, Any] | None = None) -> T:
        """Instantiate method `name` from a mapping of its dataclass fields (strings are coerced)."""
        cls = self.get(name)
        return cls(**coerce_fields(cls, dict(fields or {})))  # type: ignore[call-arg]


def coerce_fields(cls: type, fields: dict[str, Any]) -> dict[str, Any]:
    """Check names against `dataclasses.fields(cls)` and coerce CLI strings to the field's type."""
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    out: dict[str, Any] = {}
    for key, value in fields.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"{getattr(cls, 'name', cls.__name__)} has no setting {key!r}.{hint} "
                f"Settings: {', '.join(sorted(known))}"
            )
        out[key] = _coerce(value, known[key].type) if isinstance(value, str) else value
    return out


def _coerce(value: str, annotation: Any) -> Any:
    text = str(annotation)
    low = value.strip().lower()
    if low in ("none", "null") and "None" in text:
        return None
    if text.startswith("bool") or text == "<class 'bool'>":
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    for kind, conv in (("int", int), ("float", float)):
        if text.split(" ")[0].startswith(kind):
            try:
                return conv(value)
            except ValueError:
                if kind == "int":
                    try:
                        return float(value)
                    except ValueError:
                        pass
                raise ValueError(f"expected a number, got {value!r}") from None
    return value
