"""Attention scores recomputed from a block's captured queries and keys (the model keeps running SDPA).

Pure functions on tensors; the engine captures `q`/`k` projection outputs with forward hooks, so no
projection is computed twice. Only the rows a method asks for are scored: one [CLS] / last row costs
O(T), the full map O(T^2) like one attention.
"""

from __future__ import annotations

import torch


def split_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(B, T, heads*D) -> (B, heads, T, D)."""
    B, T, _ = x.shape
    return x.view(B, T, heads, head_dim).transpose(1, 2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the Hugging Face layout; x (B, h, T, D), cos/sin (B|1, T, D)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    key_bias: torch.Tensor,
    causal: bool = False,
    query_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + bias): (B, h, Tq, T).

    q (B, h, Tq, D); k (B, h_kv, T, D), shared by h / h_kv query heads (GQA); key_bias (B, T):
    -inf on padding, log(size) for merged tokens (ToMe's proportional attention). `query_pos` (Tq,)
    gives the rows' slots in 0..T-1 when `causal`.
    """
    B, h, Tq, D = q.shape
    g = h // k.shape[1]
    k = k.repeat_interleave(g, dim=1) if g > 1 else k  # (B, h, T, D)
    logits = (q.float() @ k.float().transpose(-1, -2)) / D**0.5 + key_bias[:, None, None, :]  # (B, h, Tq, T)
    if causal:
        T = k.shape[2]
        rows = torch.arange(T - Tq, T, device=q.device) if query_pos is None else query_pos
        future = torch.arange(T, device=q.device)[None, :] > rows[:, None]  # (Tq, T)
        logits = logits.masked_fill(future, -1e9)
    return logits.softmax(-1)
