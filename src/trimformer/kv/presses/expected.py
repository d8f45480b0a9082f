"""Expected attention (after Devoto et al., 2025, "Expected Attention"): score keys by the attention
they can expect from future queries, in closed form, without an attention matrix. Future queries are
modelled as Gaussian, with the mean mu and covariance S of the last `window` post-RoPE queries of
the KV group: E[exp(q.k / sqrt(d))] = exp(mu.k / sqrt(d) + k^T S k / (2 d)). The expected weights are
normalised over the held keys and multiplied by the value norm (a token moves the output by |v|).
Simplification: no extra RoPE rotation for the positions ahead."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..base import PRESSES, Observation, Press


@PRESSES.register("expected-attention")
@dataclass
class ExpectedAttention(Press):
    window: int = 64
    use_covariance: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 2:
            raise ValueError(f"expected-attention: window must be >= 2, got {self.window}")

    def score(self, obs: Observation) -> torch.Tensor:
        q = obs.queries(self.window)  # (B, H_q, w, D)
        B, Hq, w, D = q.shape
        H = obs.keys.shape[1]
        q = q.reshape(B, H, obs.groups * w, D)  # (B, H, G*w, D): a group's queries pooled
        m = obs.query_valid(self.window).repeat(1, obs.groups).to(q.dtype)[:, None, :, None]  # (B, 1, G*w, 1)
        n = m.sum(2).clamp(min=1)  # (B, 1, 1)
        mu = (q * m).sum(2) / n  # (B, H, D)
        logit = obs.keys @ mu[..., None] / math.sqrt(D)  # (B, H, L, 1)
        if self.use_covariance:
            c = (q - mu[:, :, None]) * m  # (B, H, G*w, D)
            S = c.transpose(-1, -2) @ c / n[..., None]  # (B, H, D, D)
            logit = logit + ((obs.keys @ S) * obs.keys).sum(-1, keepdim=True) / (2 * D)
        logit = logit[..., 0].masked_fill(~obs.valid, float("-inf"))  # (B, H, L)
        return logit.softmax(-1) * obs.values.norm(dim=-1)
