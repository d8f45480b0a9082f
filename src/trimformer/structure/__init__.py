"""Structured pruning: physically remove heads, KV groups, FFN neurons, hidden channels, sublayers, blocks.

    trimformer.prune_(model, trimformer.build("width", {"target": "params=0.8"}), calibration=calib)
    trimformer.export.save(model, "out/")   # plain HF, or per-layer shapes + trimformer_modeling.py
"""

from __future__ import annotations

from ..registry import Registry

STRUCTURE: Registry = Registry("structure")

from . import depth, search, width  # noqa: E402  (fill STRUCTURE)
from .sensitivity import sensitivity  # noqa: E402

__all__ = ["STRUCTURE", "depth", "search", "sensitivity", "width"]
