"""Weight pruning: unstructured, N:M and (later) block sparsity."""

from ..registry import Registry
from .base import WeightPruner

WEIGHTS: Registry[WeightPruner] = Registry("weight")

from . import allocation, magnitude, sparsegpt, wanda  # noqa: E402,F401  (explicit: fills WEIGHTS)

__all__ = ["WEIGHTS", "WeightPruner"]
