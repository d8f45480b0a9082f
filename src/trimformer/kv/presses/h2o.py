"""Heavy hitters. H2O (Zhang et al., 2023): keep the tokens with the largest attention accumulated over
every query so far. A2SF (Jo & Shin, 2024): the same with a forgetting factor, so tokens that arrived
late are not outvoted by sheer count: score = sum_i decay**(t - i) * A[i]. Observed attention (`mean`,
as kvpress's ObservedAttentionPress): the accumulated attention divided by the number of queries that
could see the token, the other fair fix for late tokens. VATP (`value_norm`, after Guo et al., 2024,
"Attention Score is not All You Need for Token Importance Indicator in KV Cache Reduction: Value Also
Matters"): the score times the token's value norm (here L2), since a token moves the output by |v|."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import PRESSES, Observation, Press


@PRESSES.register("h2o")
@dataclass
class H2O(Press):
    window: int | None = None  # queries that vote at prefill; None = every prompt token (in chunks)
    decay: float | None = None  # A2SF's forgetting factor; None = plain H2O
    mean: bool = False  # score = mean attention over the queries that saw the token (observed attention)
    value_norm: bool = False  # score x |v| (VATP)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window is not None and self.window < 1:
            raise ValueError(f"{self.name}: window must be >= 1 or None, got {self.window}")
        if self.mean and self.decay is not None:
            raise ValueError(f"{self.name}: mean=True averages plain attention; give decay=None with it")

    def observe(self, obs: Observation) -> None:
        # Accumulated attention, carried across forwards in the cache (laid out like the keys).
        window = self.window if obs.prefill else None
        acc = obs.state.get("acc")
        new = obs.attention(window, decay=self.decay)  # (B, H, L)
        if acc is None:
            acc = torch.zeros_like(new)
        if self.decay is not None:
            acc = acc * self.decay ** obs.new
        obs.state["acc"] = acc + new
        if self.mean:
            n = obs.state.get("n", torch.zeros_like(new))
            obs.state["n"] = n + obs.voters(window)[:, None].to(new.dtype)  # (B, H, L)

    def score(self, obs: Observation) -> torch.Tensor:
        score = obs.state["acc"] / obs.state["n"].clamp(min=1) if self.mean else obs.state["acc"]
        return score * obs.values.norm(dim=-1) if self.value_norm else score


@PRESSES.register("a2sf")
@dataclass
class A2SF(H2O):
    decay: float | None = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decay is None or not 0.0 < self.decay <= 1.0:
            raise ValueError(f"a2sf: decay (forgetting factor) must be in (0, 1], got {self.decay!r}")


@PRESSES.register("observed-attention")
@dataclass
class ObservedAttention(H2O):
    mean: bool = True


@PRESSES.register("vatp")
@dataclass
class VATP(H2O):
    mean: bool = True
    value_norm: bool = True
