"""The adapter between a TokenPruner and a loaded model: forward hooks on the Anatomy's blocks.

At the input of every block a pre-hook shrinks the hidden states as the method's plan says and
gathers the block's attention mask / rotary embeddings to the surviving tokens (so tokens are
physically dropped: FLOPs and latency fall). Hooks on the q/k projections keep a reference to the
previous block's queries and keys for the scores. For decoders with a KV cache, every layer caches
only the tokens it computed; later calls (decoding, continuation) see their masks gathered to match,
and with `revive` each layer first computes the prompt tokens it now needs from the Aux Cache (revive.py).
Everything is added on entry and removed in `finally`: the model leaves exactly as it came.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..models import Anatomy, anatomy_of
from .base import Context, Plan, TokenPruner
from .revive import AuxCache, gather_pe, last_query_attention, revival_mask
from .scores import apply_rope, split_heads

MASK_KWARGS = ("attention_mask",)
POSITION_KWARGS = ("position_ids",)


@dataclass
class _Forward:
    """Bookkeeping for one forward call over the current tokens of each row."""

    index: torch.Tensor  # (B, T) original position of each slot, -1 for fillers
    valid: torch.Tensor  # (B, T) bool
    sizes: torch.Tensor  # (B, T) float, original tokens per slot
    source: torch.Tensor  # (B, T0) slot of each original token, -1 for padding
    n: torch.Tensor  # (B,) real tokens per row at the start
    frozen: torch.Tensor | None = None  # (B, T0, H) fill="skip": each dropped token's state when dropped
    alive: torch.Tensor | None = None  # (B, T0) bool: the token still sits in a slot of its own
    offset: torch.Tensor | None = None  # (B, T0, H) fill="delta": own state minus its stand-in's, summed
    mix: torch.Tensor | None = None  # (B, T0, T) soft plans: how much of each slot each original token is
    counts: list[list[int]] = field(default_factory=list)  # per block input: real tokens per row
    extra_flops: float = 0.0  # scoring / matching work the method added


class TokenSession:
    """The handle `trimformer.tokens.prune(...)` yields: what the last forward did."""

    def __init__(self, model: nn.Module, method: TokenPruner):
        self.model = model
        self.method = method
        self.anatomy: Anatomy = anatomy_of(model)
        self.causal = self.anatomy.causal
        self.num_blocks = len(self.anatomy.blocks)
        a0 = self.anatomy.blocks[0].attention
        if getattr(method, "needs_attention", False) and a0 is not None and a0.qk_norm:
            raise ValueError(f"{method.name}: models with QK-norm (Qwen3, Gemma3) are not supported by attention-based "
                             "token scores yet; use 'merge' on encoders, or a LLaMA / Mistral / Qwen2 model")
        if getattr(method, "encoder_only", False) and self.causal:
            raise ValueError(f"{method.name} is for encoders and ViTs ({self.anatomy.family} is a decoder); "
                             "use 'lazy' for LLM prefill")
        if getattr(method, "decoder_only", False) and not self.causal:
            raise ValueError(f"{method.name} is for decoder LLM prefill ({self.anatomy.family} is an encoder); "
                             "use 'zero-tprune', 'merge' or 'acc'")
        method.check(self.num_blocks)
        if self.anatomy.family == "gpt2" and method.recover is None and method.reduces(self.num_blocks):
            raise ValueError(f"{method.name}: GPT-2 reshapes its last hidden states to the input length; pass "
                             f"recover={self.num_blocks} (with fill='skip' a dropped position keeps its state when dropped)")
        if hasattr(method, "prepare"):
            method.prepare(self.anatomy)
        self.state: _Forward | None = None
        self.kv_index: dict[int, torch.Tensor] = {}  # layer -> (B, n_l) original positions in its cache
        self._cap: dict[str, torch.Tensor] = {}
        self._pos: tuple[torch.Tensor, torch.Tensor] | None = None
        self._continuing = False
        self.aux: AuxCache | None = None  # LazyLLM revival: states of the tokens each layer lacks
        self._prompt_pe: Any = None  # the prompt's rotary (cos, sin), for revived tokens
        self._prompt_ok: torch.Tensor | None = None  # (B, T0) real prompt tokens
        self._reviving = False

    # -- results --------------------------------------------------------------------------------
    @property
    def counts(self) -> list[list[int]]:
        """Real tokens per row at the input of every block, for the last forward call."""
        return [] if self.state is None else self.state.counts

    def flops(self) -> dict[str, float]:
        """FLOPs of the blocks in the last forward, pruned vs dense (projections + attention + scoring)."""
        if self.state is None:
            raise RuntimeError("run a forward pass inside the context first")
        dense = pruned = 0.0
        n0 = self.state.counts[0]
        for b, row in zip(self.anatomy.blocks, self.state.counts):
            dense += sum(block_flops(b, n, self.causal) for n in n0)
            pruned += sum(block_flops(b, n, self.causal) for n in row)
        pruned += self.state.extra_flops
        return {"dense": dense, "pruned": pruned, "ratio": pruned / dense, "reduction": 1 - pruned / dense}

    # -- hooks ----------------------------------------------------------------------------------
    def hooks(self) -> list[torch.utils.hooks.RemovableHandle]:
        out = []
        for i, b in enumerate(self.anatomy.blocks):
            out.append(b.module.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            a = b.attention
            if a is None:
                continue
            if a.qkv is not None:
                out.append(a.qkv.module.register_forward_hook(self._capture("qkv")))
            else:
                out.append(a.q.module.register_forward_hook(self._capture("q")))
                out.append(a.k.module.register_forward_hook(self._capture("k")))
        if self.method.recover == self.num_blocks:
            out.append(self.anatomy.blocks[-1].module.register_forward_hook(self._restore_output))
        return out

    def _capture(self, name: str):
        def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            self._cap[name] = out

        return hook

    def _pre_hook(self, i: int):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self._reviving:  # the block runs on revived tokens: inputs are already prepared
                return None
            return self._before_block(i, args, kwargs)  # differentiable: plans are made under no_grad

        return hook

    def _before_block(self, i: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x = args[0] if args else kwargs["hidden_states"]
        block = self.anatomy.blocks[i].module
        mask, where = _find_mask(block, args, kwargs)
        cache = _cache_of(block, args, kwargs)
        if i == 0:
            self._start(x, mask, kwargs, cache)
        if self._continuing:
            return self._continue(i, args, kwargs, mask, where)
        st = self.state
        if x.shape[:2] != st.index.shape:
            raise RuntimeError("token pruning lost track of the sequence (was the model called re-entrantly?)")
        recover = self.method.recover
        if recover == i:
            x = self._restore(x)
        elif recover is None or i < recover:  # after recovery the rest run at full length
            target = torch.minimum(self.method.targets(i, self.num_blocks, st.n), st.valid.sum(1))
            if i >= 1 and bool((target < st.valid.sum(1)).any()):
                x = self._reduce(i, x, target)
        st.counts.append(st.valid.sum(1).tolist())
        args, kwargs = self._gather_inputs(args, kwargs, mask, where, x)
        if self.causal and cache is not None:
            self.kv_index[i] = st.index.clone()
        return args, kwargs

    def _start(self, x: torch.Tensor, mask: torch.Tensor | None, kwargs: dict, cache: Any) -> None:
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        self._continuing = past > 0
        B, T = x.shape[:2]
        if self._continuing:  # decoding / continuation: new tokens are never pruned, all layers cache them
            new = torch.arange(past, past + T, device=x.device).expand(B, T)
            self.kv_index = {i: torch.cat([ix, new], 1) for i, ix in self.kv_index.items()}
            return
        self.kv_index = {}
        valid = _valid_from_mask(mask, B, T, x.device)
        self.aux = None
        if getattr(self.method, "revive", False) and cache is not None:
            self.aux, self._prompt_pe, self._prompt_ok = AuxCache(), kwargs.get("position_embeddings"), valid
        index = torch.arange(T, device=x.device).expand(B, T).clone()
        self.state = _Forward(
            index=index,
            valid=valid,
            sizes=torch.ones(B, T, device=x.device),
            source=index.masked_fill(~valid, -1),
            n=valid.sum(1),
        )

    def _context(self, i: int, x: torch.Tensor, target: torch.Tensor) -> Context:
        st = self.state
        q, k = self._qk(i - 1)
        B, T = st.index.shape
        # The first and last real tokens: [CLS] and [SEP] of encoders (ViT: the class token), the
        # attention sink and the last position of decoders.
        pos = torch.arange(T, device=x.device)
        first = torch.where(st.valid, pos, T).argmin(1)
        last = torch.where(st.valid, pos, -1).argmax(1)
        protected = torch.zeros(B, T, dtype=torch.bool, device=x.device)
        protected[torch.arange(B), first] = True
        protected[torch.arange(B), last] = True
        protected &= st.valid
        return Context(i, x, q, k, st.valid, protected, st.sizes, target, self.causal)

    def _qk(self, j: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        a = self.anatomy.blocks[j].attention
        if a is None:
            return None, None
        h, hk, D = a.num_heads, a.num_kv_heads, a.head_dim
        if "qkv" in self._cap:
            q_raw, k_raw, _ = self._cap["qkv"].split([h * D, hk * D, hk * D], dim=-1)
        else:
            q_raw, k_raw = self._cap.get("q"), self._cap.get("k")
        if q_raw is None or k_raw is None:
            return None, None
        q, k = split_heads(q_raw, h, D), split_heads(k_raw, hk, D)  # (B, h, T, D), (B, h_kv, T, D)
        if self._pos is not None:
            cos, sin = self._pos
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k

    def _reduce(self, i: int, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        st = self.state
        with torch.no_grad():  # which tokens go where is discrete; only applying the plan carries gradients
            ctx = _CountingContext(**vars(self._context(i, x.detach(), target)))
            plan = self.method.plan(ctx, recover=self.method.recover is not None)
            if plan.weights is not None:
                plan.weights = plan.weights.detach()
            st.extra_flops += ctx.flops
            if self.aux is not None:  # LazyLLM's Aux Cache: the state each dropped token had here
                B, T = st.valid.shape
                own = torch.zeros(B, T + 1, dtype=torch.bool, device=x.device)
                own = own.scatter(1, torch.where(plan.slot_valid, plan.keep, T), True)[:, :T]  # (B, T) kept as itself
                self.aux.add(i, torch.where(st.valid & ~own, st.index, -1), x.detach())
        fill = self.method.fill if self.method.recover is not None else None
        return apply_plan(plan, x, st, skip=fill == "skip", delta=fill == "delta")

    def _restore(self, x: torch.Tensor) -> torch.Tensor:
        """Full length again: every original token takes the output of the slot it was pruned or merged into."""
        st = self.state
        B, T0 = st.source.shape
        src = st.source.clamp(min=0)  # padding takes slot 0; it is masked anyway
        if st.mix is not None:  # many-to-many: a token comes back as its mixture of slots
            st.extra_flops += float((2.0 * st.n.double() * st.valid.sum(1).double() * x.shape[-1]).sum())
            out = (st.mix.to(x.dtype) @ x).masked_fill((st.source < 0)[..., None], 0.0)  # (B, T0, H)
            st.mix = None
        else:
            out = x.gather(1, src[..., None].expand(B, T0, x.shape[-1]))  # (B, T0, H)
        if st.frozen is not None:  # dropped tokens skipped the blocks in between
            out = torch.where(st.alive[..., None], out, st.frozen.to(out.dtype))
            st.frozen = st.alive = None
        if st.offset is not None:  # own state + the stand-in's update since they parted
            out = out + st.offset.to(out.dtype)
            st.offset = None
        index = torch.arange(T0, device=x.device).expand(B, T0).clone()
        valid = st.source >= 0
        st.index, st.valid, st.sizes = index, valid, torch.ones(B, T0, device=x.device)
        st.source = index.masked_fill(~valid, -1)
        return out

    def _restore_output(self, _m: nn.Module, _args: tuple, out: Any) -> Any:
        if self._continuing or self.state is None:
            return out
        if isinstance(out, tuple):
            return (self._restore(out[0]), *out[1:])
        return self._restore(out)

    def _gather_inputs(self, args: tuple, kwargs: dict, mask: torch.Tensor | None, where: Any,
                       x: torch.Tensor) -> tuple[tuple, dict]:
        st = self.state
        B, T = st.index.shape
        identity = T == st.source.shape[1] and bool((st.index == torch.arange(T, device=x.device)).all())
        merged = bool((st.sizes != 1).any())
        args = (x, *args[1:]) if args else args
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": x}
        pe = kwargs.get("position_embeddings")
        if identity and not merged:
            self._pos = pe
            return args, kwargs
        idx = st.index.clamp(min=0)
        new_mask = gather_mask(mask, idx, st.valid, self.causal, st.sizes if merged else None)
        args, kwargs = _put_mask(args, kwargs, where, new_mask)
        if pe is not None:
            pe = tuple(_gather_seq(t, idx) for t in pe)  # (B, T', D) each
            kwargs["position_embeddings"] = pe
        for name in POSITION_KWARGS:
            if torch.is_tensor(kwargs.get(name)) and kwargs[name].dim() == 2:
                kwargs[name] = _gather_seq(kwargs[name], idx)
        self._pos = pe
        return args, kwargs

    def _continue(self, i: int, args: tuple, kwargs: dict, mask: torch.Tensor | None, where: Any):
        self._pos = None
        if self.aux is not None and i >= 1 and self.aux.has(i):
            self._revive(i, args, kwargs, mask, where)
        ix = self.kv_index.get(i)
        if ix is None or mask is None and bool((ix >= 0).all()):
            return args, kwargs
        Tq = (args[0] if args else kwargs["hidden_states"]).shape[1]
        return _put_mask(args, kwargs, where, self._layer_mask(ix, mask, Tq))

    def _layer_mask(self, ix: torch.Tensor, mask: torch.Tensor | None, Tq: int) -> torch.Tensor:
        """The new queries' mask (B, 1, Tq, n) over a layer's cache, whose slots hold positions ix (B, n)."""
        B = ix.shape[0]
        valid = ix >= 0
        idx = ix.clamp(min=0)
        if mask is None:  # fillers in this layer's cache must be masked for the new queries
            new = valid[:, None, None, :].expand(B, 1, Tq, ix.shape[1])
            if self.causal and Tq > 1:
                qpos = ix[:, -Tq:]
                new = new & (idx[:, None, None, :] <= qpos[:, None, :, None])
            return new
        m = mask.expand(B, *mask.shape[1:])
        new = m.gather(3, idx[:, None, None, :].expand(B, m.shape[1], m.shape[2], ix.shape[1]))
        return _mask_keys(new, valid)

    def _revive(self, i: int, args: tuple, kwargs: dict, mask: torch.Tensor | None, where: Any) -> None:
        """LazyLLM revival before block i: compute the top-attended tokens layer i lacks (see revive.py)."""
        cache = _cache_of(self.anatomy.blocks[i].module, args, kwargs)
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) <= i:
            raise RuntimeError("lazy revive=True needs a transformers DynamicCache with per-layer keys "
                               f"(got {type(cache).__name__}); use revive=False")
        x = args[0] if args else kwargs["hidden_states"]
        B, Tq, _ = x.shape
        prev, ix = self.kv_index[i - 1], self.kv_index[i]
        keys = layers[i - 1].keys  # (B, h_kv, n, D), RoPE applied
        if keys.shape[2] != prev.shape[1]:
            raise RuntimeError("token pruning lost track of the KV cache (was the cache edited?)")
        lm = self._layer_mask(prev, mask, Tq)[:, 0, -1]  # (B, n) the last query's keys
        allowed = lm if lm.dtype == torch.bool else lm > torch.finfo(lm.dtype).min / 2
        a = self.anatomy.blocks[i - 1].attention
        q_raw = self._cap["qkv"][..., :a.num_heads * a.head_dim] if "qkv" in self._cap else self._cap["q"]
        att = last_query_attention(q_raw, keys, allowed, a.num_heads, a.head_dim, kwargs.get("position_embeddings"))
        target = self.method.targets(i, self.num_blocks, self.state.n)  # (B,) as prefill kept here
        rank = att.masked_fill(~allowed, -1.0).argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        wanted = torch.where((rank < target[:, None]) & allowed, prev, -1)  # (B, n)
        pos, states = self.aux.take(i, wanted)  # (B, R), (B, R, H)
        if not bool((pos >= 0).any()):
            return
        old = ix[:, :ix.shape[1] - Tq]  # positions in layer i's cache now; the new tokens come after
        T0 = self._prompt_ok.shape[1]
        key_ok = (old >= 0) & ((old >= T0) | self._prompt_ok.gather(1, old.clamp(min=0, max=T0 - 1)))
        call = {**kwargs}
        if "position_embeddings" in call:
            call["position_embeddings"] = gather_pe(self._prompt_pe, pos)
        if torch.is_tensor(call.get("position_ids")):
            call["position_ids"] = pos.clamp(min=0)
        if "hidden_states" in call:
            call["hidden_states"] = states
        call_args, call = _put_mask((states, *args[1:]) if args else args, call, where,
                                    revival_mask(old, key_ok, pos, states.dtype))
        self._reviving = True
        try:
            out = self.anatomy.blocks[i].module(*call_args, **call)
        finally:
            self._reviving = False
        out = out[0] if isinstance(out, tuple) else out  # (B, R, H)
        self.kv_index[i] = torch.cat([old, pos, ix[:, old.shape[1]:]], 1)
        if i + 1 < self.num_blocks:
            self.aux.add(i + 1, pos, out)
        self.aux.revived[i] = self.aux.revived.get(i, 0) + int((pos >= 0).sum())


class _CountingContext(Context):
    """A Context that counts the FLOPs of the attention maps a method asks for."""

    flops: float = 0.0

    def attention(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        B, h, T, D = self.q.shape
        Tq = T if rows is None else len(rows)
        self.flops += 2.0 * B * h * Tq * T * D + 5.0 * B * h * Tq * T  # q k^T, softmax
        return super().attention(rows)


def apply_plan(plan: Plan, x: torch.Tensor, st: _Forward, skip: bool = False, delta: bool = False) -> torch.Tensor:
    """Shrink x (B, T, H) to (B, T', H) and update the bookkeeping."""
    B, T, H = x.shape
    keep, slot_valid, dst = plan.keep, plan.slot_valid, plan.dst
    Tn = keep.shape[1]
    filler = x.gather(1, keep[..., None].expand(B, Tn, H))  # (B, T', H) each slot's representative
    soft = plan.weights is not None or st.mix is not None
    if soft:  # (B, T, T') share of each current token going to each new slot; rows of dropped tokens 0
        W = plan.weights if plan.weights is not None else _one_hot(dst, Tn)
        W = W.masked_fill(~st.valid[..., None] | ~slot_valid[:, None, :], 0.0)
    if plan.weights is not None:  # many-to-many: each slot is the size-weighted mixture it receives
        w = W * st.sizes[..., None]  # (B, T, T')
        sizes = w.sum(1)  # (B, T')
        xs = (w.transpose(1, 2).to(x.dtype) @ x) / sizes.clamp(min=1e-9)[..., None].to(x.dtype)  # (B, T', H)
        new_x = torch.where(slot_valid[..., None], xs, filler)
        st.sizes = torch.where(slot_valid, sizes, 1.0)
    elif plan.merge:  # size-weighted average of every token sent to a slot (ToMe)
        w = st.sizes.masked_fill(dst < 0, 0.0)  # (B, T)
        slot = dst.clamp(min=0)
        sizes = torch.zeros(B, Tn, device=x.device).scatter_add(1, slot, w)
        xs = torch.zeros(B, Tn, H, device=x.device, dtype=x.dtype)
        xs = xs.scatter_add(1, slot[..., None].expand(B, T, H), x * w[..., None].to(x.dtype))
        new_x = torch.where(slot_valid[..., None], xs / sizes.clamp(min=1e-9)[..., None].to(x.dtype), filler)
        st.sizes = torch.where(slot_valid, sizes, 1.0)
    else:
        new_x = filler
        st.sizes = st.sizes.gather(1, keep)
    B0, T0 = st.source.shape
    src = st.source.clamp(min=0)  # (B, T0) current slot of each original token
    if skip:  # remember the state of every token that loses its own slot now
        own = torch.zeros(B, T + 1, dtype=torch.bool, device=x.device)
        own = own.scatter(1, torch.where(slot_valid, keep, T), True)[:, :T]  # (B, T) still represented by itself
        if st.frozen is None:
            st.frozen, st.alive = torch.zeros(B0, T0, H, device=x.device, dtype=x.dtype), st.source >= 0
        drop = st.alive & ~own.gather(1, src)
        st.frozen = torch.where(drop[..., None], x.gather(1, src[..., None].expand(B0, T0, H)), st.frozen)
        st.alive = st.alive & ~drop
    if soft and st.mix is None:
        st.mix = _one_hot(st.source, T)  # (B, T0, T)
    if delta:  # every original token remembers how far it sits from what now stands for it
        if soft:
            gap = x - W.to(x.dtype) @ new_x  # (B, T, H) own state minus its mixture of new slots
            gap = gap.masked_fill((W.sum(-1) == 0)[..., None], 0.0)
            moved = st.mix.to(x.dtype) @ gap  # (B, T0, H)
        else:
            gap = x - new_x.gather(1, dst.clamp(min=0)[..., None].expand(B, T, H))  # (B, T, H)
            gap = gap.masked_fill((dst < 0)[..., None], 0.0)
            moved = gap.gather(1, src[..., None].expand(B0, T0, H)).masked_fill((st.source < 0)[..., None], 0.0)
        st.offset = moved if st.offset is None else st.offset + moved
    if soft:
        st.mix = st.mix @ W  # (B, T0, T')
    st.index = torch.where(slot_valid, st.index.gather(1, keep), -1)
    st.valid = slot_valid
    # Original token o sat in slot source[o]; it now lives in dst[source[o]] (-1: dropped, no recovery).
    moved_to = dst.gather(1, src)
    st.source = torch.where(st.source >= 0, moved_to, -1)
    return new_x


def _one_hot(slot: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T) slot indices (-1: none) -> (B, T, n) float one-hot rows (zero where -1)."""
    out = torch.zeros(*slot.shape, n + 1, device=slot.device)
    return out.scatter(2, torch.where(slot >= 0, slot, n)[..., None], 1.0)[..., :n]


def block_flops(block: Any, n: int, causal: bool) -> float:
    """Multiply-adds x2 of one block on n tokens: projections, plus attention scores and mixing."""
    params = sum(p.weight.numel() for p in block.projections().values())
    a = block.attention
    attn = 0.0
    if a is not None:
        keys = (n + 1) / 2 if causal else n  # causal: each query sees the tokens before it
        attn = 2.0 * 2.0 * n * keys * a.num_heads * a.head_dim
    return 2.0 * n * params + attn


# -- masks and positions: Hugging Face conventions, not model classes ------------------------------
CACHE_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")


def _cache_of(block: nn.Module, args: tuple, kwargs: dict) -> Any:
    """The KV cache a block gets: a keyword, or the positional argument its signature names so."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    for name in CACHE_NAMES:
        pos = _arg_position(type(block), name)
        if pos is not None and pos < len(args):
            return args[pos]
    return None


def _find_mask(block: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, Any]:
    """The 4-D attention mask a block gets: a keyword, or the positional argument its forward's
    signature names `attention_mask` (BERT: second; GPT-2: third, after the cache)."""
    for name in MASK_KWARGS:
        if name in kwargs:
            return kwargs[name], name
    pos = _arg_position(type(block), "attention_mask")
    if pos is not None and pos < len(args):
        return args[pos], pos
    return None, "attention_mask"


@functools.cache
def _arg_position(block_type: type, name: str) -> int | None:
    """Index of argument `name` among a block's positional arguments (self excluded), or None."""
    names = [p.name for p in inspect.signature(block_type.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
    return names.index(name) if name in names else None


def _put_mask(args: tuple, kwargs: dict, where: Any, mask: torch.Tensor | None) -> tuple[tuple, dict]:
    if isinstance(where, int):
        return (*args[:where], mask, *args[where + 1:]), kwargs
    return args, {**kwargs, where: mask}


def _valid_from_mask(mask: torch.Tensor | None, B: int, T: int, device: torch.device) -> torch.Tensor:
    """(B, T) real tokens: keys some query may attend to."""
    if mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return allowed.any(dim=2).any(dim=1).expand(B, T)[:, -T:].clone()


def _mask_keys(mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask & valid[:, None, None, :]
    return mask.masked_fill(~valid[:, None, None, :], torch.finfo(mask.dtype).min)


def gather_mask(mask: torch.Tensor | None, idx: torch.Tensor, valid: torch.Tensor, causal: bool,
                sizes: torch.Tensor | None = None) -> torch.Tensor | None:
    """The block's mask over the current slots (B, 1, T'|1, T'), filler keys masked, log(size) added."""
    B, T = idx.shape
    has_filler = not bool(valid.all())
    if mask is None and not has_filler and sizes is None:
        return None  # no padding: SDPA's own causal / full attention stays exact over the kept order
    if not causal:  # encoders: the mask only hides padding keys, now the invalid slots (B, 1, 1, T')
        m = valid[:, None, None, :]
    elif mask is None:
        m = idx[:, None, None, :] <= idx[:, None, :, None]  # (B, 1, T', T') by original positions
    else:
        m = mask.expand(B, *mask.shape[1:])
        if m.shape[2] > 1:
            m = m.gather(2, idx[:, None, :, None].expand(B, m.shape[1], T, m.shape[3]))
        m = m.gather(3, idx[:, None, None, :].expand(B, m.shape[1], m.shape[2], T))
    m = _mask_keys(m, valid)
    if sizes is not None:  # proportional attention: a merged token counts as many
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, device=m.device).masked_fill(~m, torch.finfo(torch.float32).min)
        m = m + sizes.clamp(min=1).log()[:, None, None, :].to(m.dtype)
    return m


def _gather_seq(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather dim 1 (sequence) of (B|1, T, ...) by idx (B, T')."""
    B = idx.shape[0]
    t = t.expand(B, *t.shape[1:])
    extra = t.shape[2:]
    return t.gather(1, idx.view(B, -1, *([1] * len(extra))).expand(B, idx.shape[1], *extra))


@contextmanager
def attach(model: nn.Module, method: TokenPruner) -> Iterator[TokenSession]:
    session = TokenSession(model, method)
    handles = session.hooks()
    try:
        yield session
    finally:
        for h in handles:
            h.remove()
