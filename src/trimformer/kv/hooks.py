"""`trimformer.kv.press(model, ...)`: forward hooks that give the model a `PressCache`, mask what each head
does not hold, and compress after each attention block. Added on entry, removed on exit; nothing patched."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from ..models import Anatomy, UnsupportedModelError, anatomy_of
from .base import Observation, Press
from .build import build_press
from .cache import PressCache


class Session:
    """The hooks' shared state while a press is active."""

    def __init__(self, model: nn.Module, anatomy: Anatomy, press: Press, decode_budget: int | None):
        self.model, self.anatomy, self.press, self.decode_budget = model, anatomy, press, decode_budget
        self.inputs: dict[int, tuple] = {}

    def new_cache(self) -> PressCache:
        return PressCache(len(self.anatomy.blocks), [b.attention.window for b in self.anatomy.blocks])

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> PressCache:
        """Compress a context once (query-agnostic); reuse the result with `cache.copy()` per question."""
        cache = self.new_cache()
        self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
        return cache

    # -- hooks -----------------------------------------------------------------------------------------
    def before_model(self, module: nn.Module, args: tuple, kwargs: dict):
        if kwargs.get("use_cache") is False:
            return None
        cache = kwargs.pop("past_key_values", None)
        cache = kwargs.get("cache", cache)
        if not isinstance(cache, PressCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("a KV press needs its own cache: pass cache=None (or a cache it produced), "
                                 f"not a filled {type(cache).__name__}")
            cache = self.new_cache()
        kwargs["cache"] = cache
        ids = args[0] if args else kwargs.get("input_ids")
        x = ids if ids is not None else kwargs.get("inputs_embeds")
        B, q = x.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError("a KV press needs a 2-D attention_mask (batch, tokens) for padding, not a "
                             f"{mask.dim()}-D one")
        cache.new_valid = (mask[:, -q:].bool() if mask is not None
                           else torch.ones(B, q, dtype=torch.bool, device=x.device))
        cache.all_new = mask is None or bool(cache.new_valid.all())
        return args, kwargs

    def before_attention(self, i: int, module: nn.Module, args: tuple, kwargs: dict):
        cache = kwargs.get("cache")
        if not isinstance(cache, PressCache):
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        layer = cache.layers[i]
        if self.appends_only(cache, i, hidden.shape[1]):
            # Decoding with nothing to evict and no per-token state: the cache appends in place, and
            # attention reads the held tokens (the new one included) under a per-head length mask.
            layer.append_next = True
            a = self.anatomy.blocks[i].attention
            kwargs["attention_mask"] = layer.decode_bias(a.num_heads // a.num_kv_heads, hidden.dtype)
            return args, kwargs
        self.inputs[i] = (hidden, kwargs.get("position_embeddings"))
        kwargs["attention_mask"] = self.attention_mask(cache, i, hidden.shape[1], hidden.dtype,
                                                       kwargs.get("attention_mask"))
        return args, kwargs

    def appends_only(self, cache: PressCache, i: int, q: int) -> bool:
        layer = cache.layers[i]
        # Accumulating presses observe decode steps only under a decode budget, the one case where their
        # scores are used again (without one, nothing is ever evicted after the prefill).
        return (q == 1 and layer.is_initialized and layer.stored_length() > 0 and cache.all_new
                and (self.decode_budget is None
                     or (not self.press.observes and layer.stored_length() < self.decode_budget)))

    def attention_mask(self, cache: PressCache, i: int, q: int, dtype: torch.dtype,
                       incoming: torch.Tensor | None) -> torch.Tensor | None:
        """Additive (B, 1 or H_q, q, L_old + q) mask: hide the slots a head does not hold, padding, the future."""
        layer = cache.layers[i]
        new_valid = cache.new_valid  # (B, q)
        old = layer.stored_length()
        all_new = bool(new_valid.all())
        if all_new and layer.uniform() and ((old == 0 and incoming is None) or q == 1):
            return None  # no padding, no ragged heads: the model's own causal handling is exact
        B, dev = new_valid.shape[0], new_valid.device
        causal = torch.ones(q, q, dtype=torch.bool, device=dev).tril()  # (q, q)
        new = (causal & new_valid[:, None, :]) | torch.eye(q, dtype=torch.bool, device=dev)  # (B, q, q)
        if old == 0:
            allowed = new[:, None]  # (B, 1, q, q)
        else:
            held = torch.arange(old, device=dev) < layer.lengths[..., None]  # (B, H, old)
            if bool((layer.lengths == layer.lengths[:, :1]).all()):
                held = held[:, :1]  # same length in every head of a row: one mask for all heads
            else:
                held = held.repeat_interleave(self.anatomy.blocks[i].attention.num_heads // held.shape[1], dim=1)
            Hm = held.shape[1]
            allowed = torch.cat([held[:, :, None, :].expand(B, Hm, q, old), new[:, None].expand(B, Hm, q, q)], -1)
        return torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(~allowed, torch.finfo(dtype).min)

    @torch.no_grad()
    def after_attention(self, i: int, module: nn.Module, args: tuple, kwargs: dict, output):
        cache = kwargs.get("cache")
        if not isinstance(cache, PressCache):
            return None
        layer = cache.layers[i]
        p = layer.pending
        if p is None:  # the forward only appended (see `appends_only`)
            return None
        B, H, L, _ = p["keys"].shape
        old_valid = p["old_valid"]
        if old_valid is None:
            old_valid = torch.ones(B, H, p["old"], dtype=torch.bool, device=p["keys"].device)
        valid = torch.cat([old_valid, cache.new_valid[:, None, :].expand(B, H, p["new"])], dim=2)  # (B, H, L)
        hidden, pe = self.inputs.pop(i)
        obs = Observation(i, len(self.anatomy.blocks), p["keys"], p["values"], valid, p["new"], cache.new_valid,
                          hidden, self.anatomy.blocks[i].attention, pe, p["state"], prefill=p["old"] == 0)
        press = self.press
        press.observe(obs)
        budget = press.budget(obs, self.decode_budget)
        keep = None
        if budget is not None and bool((budget < valid.sum(-1)).any()):
            keep = press.select(press.score(obs), budget, obs)
        channels = press.channels(obs) if obs.prefill else None
        layer.commit(keep, valid, channels, obs.state)
        return None


@contextmanager
def press(model: nn.Module, press: str | Press, ratio: float | None = None, *,
          decode_budget: int | None = None, **settings) -> Iterator[Session]:
    """Compress the KV cache of every forward / `generate` inside the block; the model is untouched after.

    `press`: a registered name (see `trimformer.kv.PRESSES.names()`), 'token+channel' (e.g. 'snapkv+think'),
    or a press object. `ratio`: share of the prompt's cache removed. `decode_budget`: most tokens each head
    holds while decoding (the press evicts beyond it). Sliding-window layers (Gemma3's local ones) keep their window
    and are not pressed: the press compresses the global layers."""
    p = build_press(press, ratio, **settings)
    if decode_budget is not None and (not isinstance(decode_budget, int) or decode_budget < 1):
        raise ValueError(f"decode_budget must be a positive number of tokens, got {decode_budget!r}")
    anatomy = anatomy_of(model)
    if not anatomy.causal or any(b.attention is None for b in anatomy.blocks):
        raise UnsupportedModelError(
            f"KV presses need a decoder with a KV cache; {type(model).__name__} ({anatomy.family}) has none")
    session = Session(model, anatomy, p, decode_budget)
    handles = [model.register_forward_pre_hook(session.before_model, with_kwargs=True)]
    try:
        for i, block in enumerate(anatomy.blocks):
            if block.attention.window is not None:  # a sliding window bounds this cache already: not pressed
                continue
            m = block.attention.module
            handles.append(m.register_forward_pre_hook(partial(session.before_attention, i), with_kwargs=True))
            handles.append(m.register_forward_hook(partial(session.after_attention, i), with_kwargs=True))
        yield session
    finally:
        for h in handles:
            h.remove()
