"""Presses by name: `build_press("snapkv", 0.5)`, `"snapkv+think"` (a token press and a channel press)."""

from __future__ import annotations

from dataclasses import fields

from .base import PRESSES, Press
from .compose import Compose


def build_press(press: str | Press, ratio: float | None = None, **settings) -> Press:
    """A press from a registered name ('snapkv', 'snapkv+think') or an instance (then `ratio` must be None)."""
    if isinstance(press, Press):
        if ratio is not None or settings:
            raise ValueError("give the ratio and settings to the press object itself, not next to it")
        return press
    if not isinstance(press, str):
        raise TypeError(f"press must be a name or a Press, got {type(press).__name__}")
    if "+" in press:  # a token press and a channel press, both at `ratio`; each takes the settings it has
        token, chan = press.split("+", 1)
        own = [{f.name for f in fields(PRESSES.get(n))} for n in (token, chan)]
        unknown = set(settings) - own[0] - own[1]
        if unknown:
            raise ValueError(f"{press}: neither press has the setting(s) {', '.join(sorted(unknown))}")
        parts = [build_press(n, ratio, **{k: v for k, v in settings.items() if k in o}) for n, o in zip((token, chan), own)]
        return Compose(*parts)
    values = dict(settings)
    if ratio is not None:
        values["ratio"] = ratio
    return PRESSES.build(press, values)
