"""Structured pruning: physically remove heads, KV groups, FFN neurons, hidden channels, sublayers, blocks.

    trimformer.prune_(model, trimformer.build("width", {"target": "params=0.8"}), calibration=calib)
    trimformer.export.save(model, "out/")   # plain HF, or per-layer shapes + trimformer_modeling.py

Every method subclasses base.StructurePruner and takes a budget of budget.py (params=, flops=, latency=,
compute=, remove=).
"""

from __future__ import annotations

from ..registry import Registry

STRUCTURE: Registry = Registry("structure")

from . import depth, finercut, search, width  # noqa: E402  (fill STRUCTURE)
from .budget import Budget, BudgetError  # noqa: E402
from .sensitivity import sensitivity  # noqa: E402

__all__ = ["STRUCTURE", "Budget", "BudgetError", "depth", "finercut", "search", "sensitivity", "width"]
