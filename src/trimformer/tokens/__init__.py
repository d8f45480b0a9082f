"""Token pruning and merging at inference: a context manager that plugs into a loaded model.

    with trimformer.tokens.prune(model, "zero-tprune", keep=0.6) as session:
        out = model(**batch)
    session.counts, session.flops()

Methods: zero-tprune, merge (ToMe), transform (many-to-many Token Transforming), eet (stage by stage), acc (latency
target), lazy (LLM prefill; `revive=True` revives pruned tokens while decoding). Every method also
takes `keep` (share of each row's tokens reaching the last block; geometric from block `start`),
`schedule` (share at every block instead), `flops` (a share of dense block FLOPs; solves `keep`),
`recover` (restore full length before that block; len(blocks) = after the last one, so per-token
outputs keep their shape) and `fill` ("copy": a restored token takes its stand-in's output; "skip":
its own state from when it was dropped; "delta": its own state plus its stand-in's update since).
Pruned tokens are physically dropped between blocks; rows with padding keep their own counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from ..registry import Registry

TOKENS: Registry = Registry("token")

# Explicit imports fill the registry (no discovery).
from . import acc, coverage, eet, lazy, merge, transform, zero_tprune  # noqa: E402,F401
from .base import Context, Plan, TokenPruner  # noqa: E402
from .engine import TokenSession, attach  # noqa: E402


def build(name: str, settings: dict[str, Any] | None = None) -> TokenPruner:
    return TOKENS.build(name, settings)


@contextmanager
def prune(model: nn.Module, method: str | TokenPruner, **settings: Any) -> Iterator[TokenSession]:
    """Prune tokens in every forward call inside the block; the model is unchanged on exit."""
    if isinstance(method, str):
        method = build(method, settings)
    elif settings:
        raise ValueError("pass settings either in the method object or as keywords, not both")
    if not isinstance(method, TokenPruner):
        raise TypeError(f"method must be a name ({', '.join(TOKENS.names())}) or a TokenPruner, got {type(method).__name__}")
    with attach(model, method) as session:
        yield session


__all__ = ["TOKENS", "Context", "Plan", "TokenPruner", "TokenSession", "build", "prune"]
