"""Structured pruning: physically remove heads, KV groups, FFN neurons, hidden channels, sublayers, blocks."""

from __future__ import annotations

from ..registry import Registry

STRUCTURE: Registry = Registry("structure")

from . import depth, width  # noqa: E402,F401  (fill STRUCTURE)

__all__ = ["STRUCTURE"]
