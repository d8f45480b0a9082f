"""Name -> method-class registries, one per family, with "did you mean" errors."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from .config import coerce_fields

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
