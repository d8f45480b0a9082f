"""Expected attention (after Devoto et al., 2025, "Expected Attention"): score keys by the attention
they can expect from future queries, in closed form, without an attention matrix. Future queries of each
head are modelled as Gaussian: the mean mu and covariance S of the prompt's pre-RoPE queries (the first
`n_sink` tokens, outliers, left out), rotated by RoPE averaged over the next `n_future` positions (R):
E[exp(q.k / sqrt(d))] = exp((R mu).k / sqrt(d) + k^T R S R^T k / (2 d)). The expected weights are
normalised over the held keys per query head, averaged over a KV group's heads and multiplied by the
value norm (a token moves the output by |v|). The first `n_sink` tokens are always kept."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..base import PRESSES, Observation, Press, rotate_half


@PRESSES.register("expected-attention")
@dataclass
class ExpectedAttention(Press):
    window: int | None = None  # last prompt queries whose statistics model the future; None = all
    n_future: int = 512
    n_sink: int = 4
    use_covariance: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window is not None and self.window < 2:
            raise ValueError(f"expected-attention: window must be >= 2 or None, got {self.window}")
        if self.n_future < 1 or self.n_sink < 0:
            raise ValueError(f"expected-attention: n_future must be >= 1 and n_sink >= 0, got {self.n_future}, "
                             f"{self.n_sink}")

    def score(self, obs: Observation) -> torch.Tensor:
        q = obs.queries(self.window, rope=False)  # (B, H_q, w, D)
        B, Hq, w, D = q.shape
        H, G = obs.keys.shape[1], obs.groups
        real = obs.query_valid(self.window)  # (B, w)
        if w == obs.new and obs.prefill:  # the prompt's first real tokens are outliers: not in the statistics
            real = real & (real.long().cumsum(-1) > self.n_sink)
        m = real.to(q.dtype)[:, None, :, None]  # (B, 1, w, 1)
        n = m.sum(2).clamp(min=1)  # (B, 1, 1)
        mu = (q * m).sum(2) / n  # (B, H_q, D)
        S = None
        if self.use_covariance:
            c = (q - mu[:, :, None]) * m  # (B, H_q, w, D)
            S = c.transpose(-1, -2) @ c / n[..., None]  # (B, H_q, D, D)
        rot = obs.future_rotation(self.n_future)
        if rot is not None:
            cos, sin = rot  # (B, D)
            mu = mu * cos[:, None] + rotate_half(mu) * sin[:, None]  # R mu
            if S is not None:
                cs, sn = cos[:, None, None], sin[:, None, None]
                S = S * cs + rotate_half(S) * sn  # S R^T (rows rotated)
                S = S.transpose(-1, -2) * cs + rotate_half(S.transpose(-1, -2)) * sn  # R S R^T
        K = obs.keys  # (B, H, L, D)
        logit = torch.einsum("bhgd,bhld->bhgl", mu.view(B, H, G, D), K) / math.sqrt(D)  # (B, H, G, L)
        if S is not None:
            KS = torch.einsum("bhld,bhgde->bhgle", K, S.view(B, H, G, D, D))  # (B, H, G, L, D)
            logit = logit + (KS * K[:, :, None]).sum(-1) / (2 * D)
        logit = logit.masked_fill(~obs.valid[:, :, None], float("-inf"))
        score = logit.softmax(-1).mean(2) * obs.values.norm(dim=-1)  # (B, H, L)
        if obs.prefill and self.n_sink:
            sink = obs.valid & (obs.valid.long().cumsum(-1) <= self.n_sink)  # the first real tokens
            score = score.masked_fill(sink, float("inf"))
        return score
