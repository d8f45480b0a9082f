"""The press interface: a press scores cached tokens (or key channels) per layer and KV head; this base
does budgets, top-k selection and bookkeeping. A method implements `score` (tokens) or `channels`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..config import Config
from ..models import Attention
from ..registry import Registry

PRESSES: Registry[Press] = Registry("KV press")


@dataclass
class Observation:
    """What a press sees for one layer during one forward. Keys are post-RoPE, materialised
    (B, H, L, D) with `valid` (B, H, L) marking real tokens; the last `new` positions are this forward's."""

    layer: int
    num_layers: int
    keys: torch.Tensor  # (B, H, L, D)
    values: torch.Tensor  # (B, H, L, Dv)
    valid: torch.Tensor  # (B, H, L) bool
    new: int  # tokens added by this forward (the last `new` of L)
    new_valid: torch.Tensor  # (B, new) bool: which of them are real (left padding)
    hidden: torch.Tensor  # (B, new, hidden): the attention block's input
    attn: Attention
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None  # RoPE (cos, sin) of the new tokens
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # per-token press state (B, H, L)
    prefill: bool = True

    @property
    def groups(self) -> int:
        return self.attn.num_heads // self.attn.num_kv_heads

    def queries(self, window: int | None = None, rope: bool = True) -> torch.Tensor:
        """Post-RoPE (pre-RoPE if `rope=False`) queries of the last `window` new tokens (all when None):
        (B, H_q, w, D). Computed here, from the block input, so the model keeps its own (SDPA) attention."""
        w = self.new if window is None else min(window, self.new)
        h = self.hidden[:, self.new - w:].contiguous()  # (B, w, hidden)
        a, D = self.attn, self.attn.head_dim
        if a.qkv is not None:  # fused [q | k | v] (GPT-2)
            q = a.qkv.module(h)[..., : a.num_heads * D]
        else:
            q = a.q.module(h)
        q = q.view(*h.shape[:2], a.num_heads, D).transpose(1, 2)  # (B, H_q, w, D)
        if a.qk_norm:
            q = a.module.q_norm(q)
        if rope and self.position_embeddings is not None:  # LLaMA-style rotate-half RoPE, as the keys got it
            cos, sin = (t[:, self.new - w:].unsqueeze(1) for t in self.position_embeddings)  # (B, 1, w, D)
            q = q * cos + rotate_half(q) * sin
        return q

    def future_rotation(self, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """RoPE averaged over the `n` positions after the last new token: (cos, sin), each (B, D), so that
        `x * cos + rotate_half(x) * sin` is the mean rotation a future query gets. None without RoPE.
        Model-agnostic: the per-channel angle step comes from the last two tokens' (cos, sin)."""
        if self.position_embeddings is None:
            return None
        cos, sin = self.position_embeddings  # (B, new, D), attention scaling included
        z = torch.complex(cos[:, -1].double(), sin[:, -1].double())  # (B, D) last position
        if self.new < 2:
            return cos[:, -1], sin[:, -1]  # no step known: the last position itself
        prev = torch.complex(cos[:, -2].double(), sin[:, -2].double())
        theta = torch.angle(z * prev.conj())  # (B, D) angle per position step
        k = torch.arange(1, n + 1, dtype=torch.float64, device=cos.device)[:, None, None]  # (n, 1, 1)
        r = z * torch.polar(torch.ones_like(k * theta), k * theta).mean(0)  # (B, D)
        return r.real.to(cos.dtype), r.imag.to(cos.dtype)

    def query_valid(self, window: int | None = None) -> torch.Tensor:
        w = self.new if window is None else min(window, self.new)
        return self.new_valid[:, self.new - w:]  # (B, w)

    def voters(self, window: int | None = None) -> torch.Tensor:
        """(B, L) how many of the last `window` new queries (all when None) see each key: the real ones at
        or after its position (causal)."""
        w = self.new if window is None else min(window, self.new)
        B, L = self.valid.shape[0], self.valid.shape[-1]
        at = torch.zeros(B, L, dtype=torch.long, device=self.valid.device)
        at[:, L - w:] = self.query_valid(window).long()  # (B, w) the voting queries, at their key index
        return at.flip(-1).cumsum(-1).flip(-1)

    def attention(self, window: int | None = None, decay: float | None = None, chunk: int = 256) -> torch.Tensor:
        """Attention of the last `window` new queries (all when None) on every cached key, summed over
        those queries (weights `decay**age` when given) and over each KV group's query heads: (B, H, L).
        Computed in chunks of queries, never as a full (L, L) matrix."""
        w = self.new if window is None else min(window, self.new)
        B, H, L, D = self.keys.shape
        out = self.keys.new_zeros(B, H, L)
        for start in range(self.new - w, self.new, chunk):
            stop = min(start + chunk, self.new)
            out += self._attention_chunk(start, stop, decay)
        return out

    def _attention_chunk(self, start: int, stop: int, decay: float | None) -> torch.Tensor:
        B, H, L, D = self.keys.shape
        c = stop - start
        h = self.hidden[:, start:stop]
        pe = None if self.position_embeddings is None else tuple(t[:, start:stop] for t in self.position_embeddings)
        sub = Observation(self.layer, self.num_layers, self.keys, self.values, self.valid, c,
                          self.new_valid[:, start:stop], h, self.attn, pe)
        q = sub.queries().reshape(B, H, self.groups * c, D)  # (B, H, G*c, D): a group's heads share keys
        logits = q @ self.keys.transpose(-1, -2) / math.sqrt(D)  # (B, H, G*c, L)
        logits = logits.view(B, H, self.groups, c, L)
        old = L - self.new
        qpos = old + torch.arange(start, stop, device=q.device)  # (c,) index of each query among keys
        causal = torch.arange(L, device=q.device)[None, :] <= qpos[:, None]  # (c, L)
        allowed = self.valid[:, :, None, None, :] & causal  # (B, H, 1, c, L)
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        weight = self.new_valid[:, start:stop].to(probs.dtype)  # (B, c): padding queries count for nothing
        if decay is not None:
            weight = weight * decay ** (self.new - 1 - torch.arange(start, stop, device=q.device)).to(probs.dtype)
        return torch.einsum("bhgcl,bc->bhl", probs, weight)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class Press(Config):
    """Base of every press. `ratio` is the share of cached tokens removed (0 = keep all)."""

    ratio: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.ratio, (int, float)) or not 0.0 <= self.ratio < 1.0:
            raise ValueError(
                f"{type(self).__name__}: ratio must be in [0, 1) (the share of the cache removed), got {self.ratio!r}"
            )

    # -- what a method implements -------------------------------------------------------------------
    def score(self, obs: Observation) -> torch.Tensor:
        """(B, H, L) importance of each cached token; higher is kept."""
        raise NotImplementedError

    def channels(self, obs: Observation) -> torch.Tensor | None:
        """(B, H, Dk) key channels to keep, or None (token presses)."""
        return None

    def observe(self, obs: Observation) -> None:
        """Update per-token state in `obs.state` every forward (accumulating presses)."""

    @property
    def observes(self) -> bool:
        """Whether `observe` does anything (decoding without a decode budget never observes: it appends)."""
        return type(self).observe is not Press.observe

    # -- budgets and selection (the base's job) ------------------------------------------------------
    def layer_ratio(self, layer: int, num_layers: int) -> float:
        return self.ratio

    def budget(self, obs: Observation, decode_budget: int | None) -> torch.Tensor | None:
        """(B, H) tokens to keep after this forward, or None to keep every valid token."""
        n = obs.valid.sum(-1)  # (B, H)
        if obs.prefill:
            r = self.layer_ratio(obs.layer, obs.num_layers)
            if r > 0:
                keep = n - torch.round(r * n.to(torch.float64)).long()
                return keep if decode_budget is None else keep.clamp(max=decode_budget)
        if decode_budget is not None and bool((n > decode_budget).any()):
            return n.clamp(max=decode_budget)
        return None

    def select(self, scores: torch.Tensor, keep: torch.Tensor, obs: Observation) -> torch.Tensor:
        """(B, H, L) mask of the `keep[b, h]` best-scored valid tokens of each head."""
        return top_per_head(scores.masked_fill(~obs.valid, float("-inf")), keep)


def top_per_head(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mask of the keep[b, h] highest scores along the last dim; ties broken by position (deterministic)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)  # (B, H, L)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                           .expand_as(order))
    return rank < keep[..., None]
