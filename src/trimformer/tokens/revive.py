"""LazyLLM's Aux Cache: pruned prompt tokens can be revived at later decoding steps.

When prefill drops a token at block l, its hidden state at the input of block l goes to the aux
cache of layer l. At every later step, at each block l the current last position ranks the tokens
block l-1 holds by its attention there (mean over heads, as prefill did); the top `targets(l)` of
them must be in layer l's KV cache, and those that are not are computed now: block l runs on their
aux states (attending to layer l's cache and to each other, causally by original position), their
keys / values join layer l's cache, and their outputs move to the aux cache of layer l+1, where the
next block may revive them in turn. Every token is computed at most once per layer.
"""

from __future__ import annotations

from typing import Any

import torch

from .scores import apply_rope, attention_probs, split_heads


class AuxCache:
    """Per layer: original positions (B, R) (-1: filler) and states (B, R, H) of tokens it lacks."""

    def __init__(self) -> None:
        self.pos: dict[int, torch.Tensor] = {}
        self.states: dict[int, torch.Tensor] = {}
        self.revived: dict[int, int] = {}  # layer -> tokens revived there so far (all rows)

    def add(self, layer: int, pos: torch.Tensor, states: torch.Tensor) -> None:
        """Append (B, R) positions (-1: none) and (B, R, H) states, then drop the empty columns."""
        if layer in self.pos:
            pos, states = torch.cat([self.pos[layer], pos], 1), torch.cat([self.states[layer], states], 1)
        self.pos[layer], self.states[layer] = _pack(pos, states)

    def take(self, layer: int, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove and return the entries of `layer` whose positions are in wanted (B, n) (-1: none),
        packed to (B, R) positions (-1: filler, in original order) and (B, R, H) states."""
        pos, states = self.pos[layer], self.states[layer]
        hit = (pos[:, :, None] == wanted[:, None, :]).any(-1) & (pos >= 0)  # (B, R0)
        out = _pack(torch.where(hit, pos, -1), states)
        self.pos[layer], self.states[layer] = _pack(torch.where(hit, -1, pos), states)
        return out

    def has(self, layer: int) -> bool:
        return layer in self.pos and bool((self.pos[layer] >= 0).any())


def _pack(pos: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real entries first, in position order; as many columns as the fullest row."""
    B, R = pos.shape
    key = torch.where(pos >= 0, pos, torch.iinfo(torch.long).max)
    order = key.argsort(dim=1, stable=True)  # (B, R)
    n = int((pos >= 0).sum(1).max()) if R else 0
    order = order[:, :n]
    return pos.gather(1, order), states.gather(1, order[..., None].expand(B, n, states.shape[-1]))


def last_query_attention(q_raw: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, heads: int,
                         head_dim: int, pe: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """(B, n) mean-over-heads attention of the last query (q_raw (B, Tq, h*D), before RoPE) over a
    layer's cached keys (B, h_kv, n, D), RoPE applied; allowed (B, n) bool."""
    q = split_heads(q_raw[:, -1:], heads, head_dim)  # (B, h, 1, D)
    if pe is not None:
        cos, sin = pe
        q = apply_rope(q, cos[:, -1:], sin[:, -1:])
    bias = torch.zeros(allowed.shape, device=q.device).masked_fill(~allowed, -1e9)
    return attention_probs(q, keys, bias).mean(1)[:, 0]  # (B, n)


def revival_mask(key_pos: torch.Tensor, key_ok: torch.Tensor, q_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, R, n + R) for revived queries at q_pos (B, R) (-1: filler) over the layer's
    cache keys at key_pos (B, n) (key_ok: real and not padding) followed by the revived tokens."""
    kp = torch.cat([key_pos, q_pos], 1)  # (B, n + R)
    ok = torch.cat([key_ok, q_pos >= 0], 1)
    allow = ok[:, None, :] & (kp[:, None, :] <= q_pos[:, :, None])  # (B, R, n + R)
    R, n = q_pos.shape[1], key_pos.shape[1]
    self_col = torch.arange(R, device=q_pos.device)
    allow[:, self_col, n + self_col] = True  # fillers see themselves: no empty softmax rows
    return torch.zeros(allow.shape, dtype=dtype, device=q_pos.device).masked_fill(
        ~allow, torch.finfo(dtype).min)[:, None]


def gather_pe(pe: tuple[torch.Tensor, torch.Tensor] | None, pos: torch.Tensor) -> Any:
    """Rotary (cos, sin) (B|1, T0, D) of the prompt at positions pos (B, R) (-1: position 0)."""
    if pe is None:
        return None
    B, R = pos.shape
    idx = pos.clamp(min=0)
    return tuple(t.expand(B, *t.shape[1:]).gather(1, idx[..., None].expand(B, R, t.shape[-1])) for t in pe)
