"""KV presses on tiny random decoders: exact budgets, packed storage, equivalences, clean exit, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny
from transformers import DynamicCache

from trimformer import kv
from trimformer.kv.base import rotate_half
from trimformer.models import UnsupportedModelError

FAMILIES = ["llama", "gpt2", "opt", "qwen2"]  # GQA + RoPE, fused qkv + learned positions, separate q/k/v + bias, q/k/v bias + untied head (gemma3: test_families.py)
# Small windows so that the tiny prompts are longer than every observation window.
SMALL = {"snapkv": {"window": 4, "kernel": 3}, "expected-attention": {"n_sink": 2}, "think": {"window": 4},
         "h2o": {}, "a2sf": {}, "observed-attention": {}, "vatp": {}, "tova": {}, "knorm": {}, "random": {}, "streaming": {"n_sink": 2},
         "rolling": {"n_anchor": 2, "recent": 3}}
TOKEN_PRESSES = [n for n in SMALL if n != "think"]


@pytest.fixture(scope="module")
def models():
    return {f: tiny(f) for f in FAMILIES + ["gemma3"]}


def prompt(B: int = 1, T: int = 20, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def continuation(model, name, ratio, ids, split, **kw):
    """Logits of ids[:, split:] scored on a cache of ids[:, :split] compressed by the press."""
    with kv.press(model, name, ratio, **kw) as s:
        cache = s.prefill(ids[:, :split])
        return model(ids[:, split:], cache=cache).logits, cache


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(SMALL))
def test_ratio_zero_changes_no_logit(models, family, name):
    m, ids = models[family], prompt(2, 20)
    with torch.no_grad():
        full = m(ids).logits
    logits, cache = continuation(m, name, 0.0, ids, 14, **SMALL[name])
    torch.testing.assert_close(logits, full[:, 14:], rtol=0, atol=1e-5)
    assert cache.get_seq_length() == 20


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", TOKEN_PRESSES)
def test_each_press_keeps_exactly_its_budget_per_head(models, family, name):
    m, ids = models[family], prompt(2, 20)
    with kv.press(m, name, 0.75, **SMALL[name]) as s:
        cache = s.prefill(ids)
    kept = cache.kept_tokens()  # (layers, B, H)
    assert (kept == 20 - 15).all()
    for layer in cache.layers:  # packed: exactly the kept tokens, nothing else
        assert layer.keys.shape[0] == layer.values.shape[0] == int(layer.lengths.sum())
    full_bytes = 2 * 20 * sum(layer.lengths.shape.numel() * layer.head_dim * 4 for layer in cache.layers)
    assert cache.nbytes == full_bytes * 5 // 20


def test_per_head_budgets_are_stored_packed_without_padding(models):
    m, ids = models["llama"], prompt(2, 24)
    with kv.press(m, kv.PerHead(kv.SnapKV(window=4, kernel=1), ratio=0.5, floor=0.2)) as s:
        cache = s.prefill(ids)
    kept = cache.kept_tokens()  # (layers, B, H)
    assert (kept.sum(-1) == 12 * kept.shape[-1]).all()  # the layer budget is met per row...
    assert (kept >= 2).all()  # ...each head keeps at least floor x its share (0.2 x 12)
    assert (kept != kept[..., :1]).any()  # ...and heads really differ
    for layer in cache.layers:
        assert layer.keys.shape == (int(layer.lengths.sum()), layer.head_dim)  # not B*H*max_len


class Recording(kv.PerHead):
    """PerHead that remembers which tokens it kept, for an independent reference."""

    def select(self, scores, keep, obs):
        mask = super().select(scores, keep, obs)
        self.kept = {**getattr(self, "kept", {}), obs.layer: mask.clone()}
        return mask


@torch.no_grad()
def test_ragged_heads_attend_exactly_to_what_they_hold(models):
    # Reference: full DynamicCache, and a per-head mask hiding the evicted tokens (plain HF attention).
    m, ids = models["llama"], prompt(1, 24)
    press = Recording(kv.SnapKV(window=4, kernel=1), ratio=0.5)
    ours, cache = continuation(m, press, None, ids, 18)
    assert (cache.kept_tokens()[:, 0] != cache.kept_tokens()[:, 0, :1]).any()
    ref_cache = DynamicCache(config=m.config)
    m(ids[:, :18], cache=ref_cache)
    groups = m.config.num_attention_heads // m.config.num_key_value_heads
    handles = []
    for i, layer in enumerate(m.model.layers):
        held = press.kept[i].repeat_interleave(groups, dim=1)  # (1, H_q, 18)
        allowed = torch.cat([held[:, :, None].expand(-1, -1, 6, -1), torch.ones(1, 1, 6, 6).tril().bool()
                             .expand(1, held.shape[1], 6, 6)], -1)
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)

        def hook(mod, args, kwargs, mask=mask):
            kwargs["attention_mask"] = mask
            return args, kwargs

        handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        ref = m(ids[:, 18:], cache=ref_cache).logits
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("grow", [2, 32])
@pytest.mark.parametrize("per_head", [False, True])
@torch.no_grad()
def test_decoding_appends_in_place_and_matches_one_forward(models, monkeypatch, per_head, grow, family):
    # Token-by-token decoding (the in-place append path, segments growing `grow` slots at a time) gives
    # the logits of one teacher-forced forward on the same compressed cache (the general path).
    monkeypatch.setattr(kv.PressLayer, "grow", grow)
    m, ids = models[family], prompt(2, 23)
    snap = kv.SnapKV(0.5, window=4, kernel=1)
    press = kv.PerHead(snap, ratio=0.5) if per_head else snap
    with kv.press(m, press) as s:
        cache = s.prefill(ids[:, :18])
        kept = cache.kept_tokens()
        one = m(ids[:, 18:], cache=cache.copy()).logits
        steps = torch.cat([m(ids[:, t:t + 1], cache=cache).logits for t in range(18, 23)], 1)
    assert per_head == bool((kept != kept[..., :1]).any())  # ragged heads only with per-head budgets
    torch.testing.assert_close(steps, one, rtol=0, atol=1e-5)
    assert (cache.kept_tokens() == kept + 5).all()
    token_bytes = 2 * cache.layers[0].head_dim * 4
    assert cache.nbytes == int(cache.kept_tokens().sum()) * token_bytes  # bytes held = tokens kept
    slack = cache.reserved_bytes - cache.nbytes
    assert 0 < slack <= kv.PressLayer.grow * kept.numel() * token_bytes  # < `grow` slots per segment


@pytest.mark.parametrize("family", FAMILIES + ["gemma3"])  # gemma3: its sliding layers are not pressed
@torch.no_grad()
def test_left_padded_batch_equals_rows_alone(models, family):
    m = models[family]
    lengths, T, extra = [20, 13], 20, 4
    rows = [prompt(1, n + extra, seed=10 + i) for i, n in enumerate(lengths)]
    ids = torch.zeros(2, T + extra, dtype=torch.long)
    mask = torch.zeros(2, T + extra, dtype=torch.long)
    for i, (r, n) in enumerate(zip(rows, lengths)):
        ids[i, T - n:] = r[0]
        mask[i, T - n:] = 1
    press = kv.SnapKV(ratio=0.5, window=4, kernel=3)
    with kv.press(m, press) as s:
        cache = s.new_cache()
        m(ids[:, :T], attention_mask=mask[:, :T], position_ids=positions(mask)[:, :T], cache=cache)
        batch = m(ids[:, T:], attention_mask=mask, position_ids=positions(mask)[:, T:], cache=cache).logits
        assert cache.kept_tokens()[-1, :, 0].tolist() == [n - n // 2 + extra for n in lengths]
        for i, (r, n) in enumerate(zip(rows, lengths)):
            alone = s.prefill(r[:, :n])
            one = m(r[:, n:], cache=alone).logits
            torch.testing.assert_close(batch[i:i + 1], one, rtol=0, atol=1e-5)


@torch.no_grad()
def test_generate_left_padded_batch_matches_rows(models):
    m = models["llama"]
    a, b = prompt(1, 16, seed=5), prompt(1, 10, seed=6)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 6, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 16), torch.cat([torch.zeros(1, 6), torch.ones(1, 10)], 1)]).long()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with kv.press(m, "tova", 0.5, decode_budget=10):
        both = m.generate(ids, attention_mask=mask, **kw)[:, 16:]
        one_a = m.generate(a, **kw)[:, 16:]
        one_b = m.generate(b, **kw)[:, 10:]
    assert torch.equal(both, torch.cat([one_a, one_b]))


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_streaming_keeps_exactly_sinks_and_window(models, family):
    m, ids = models[family], prompt(1, 20)
    full = DynamicCache(config=m.config)
    m(ids, cache=full)
    with kv.press(m, "streaming", 0.5, n_sink=3) as s:
        cache = s.prefill(ids)
        for i, layer in enumerate(cache.layers):
            ref = full.layers[i].keys  # (1, H, 20, D)
            kept = torch.cat([ref[:, :, :3], ref[:, :, 20 - 7:]], 2)  # 3 sinks + the 7 most recent
            torch.testing.assert_close(layer.keys.view(kept.shape), kept, rtol=0, atol=0)
        # while decoding under a budget: still the sinks and the newest tokens
        out = m.generate(ids, max_new_tokens=5, do_sample=False, cache=s.new_cache(), return_dict_in_generate=True)
    seq = out.sequences
    full = DynamicCache(config=m.config)
    m(seq[:, :-1], cache=full)
    layer = out.cache.layers[0]
    n = 10 + 4  # 10 kept at prefill, + 4 cached decode tokens (the last one is not fed back)
    ref = full.layers[0].keys
    torch.testing.assert_close(layer.dense()[0],
                               torch.cat([ref[:, :, :3], ref[:, :, 24 - (n - 3):]], 2), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_decode_budget_caps_every_head(models, family):
    m, ids = models[family], prompt(2, 16)
    with kv.press(m, "a2sf", 0.5, decode_budget=11) as s:
        out = m.generate(ids, max_new_tokens=8, do_sample=False, cache=s.new_cache(), pad_token_id=0,
                         return_dict_in_generate=True)
    assert (out.cache.kept_tokens() == 11).all()  # 8 after prefill, grew to 11, then held at 11


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_think_removes_channels_and_matches_zeroed_reference(models, family):
    m, ids = models[family], prompt(2, 20)
    ours, cache = continuation(m, "think", 0.5, ids, 14, window=4)
    ref_cache = DynamicCache(config=m.config)
    m(ids[:, :14], cache=ref_cache)
    for i, layer in enumerate(cache.layers):
        D = layer.head_dim
        assert layer.keys.shape[-1] == D - round(0.5 * D)  # really removed from storage
        assert layer.values.shape[-1] == D
        K = ref_cache.layers[i].keys  # (B, H, 14, D)
        zero = torch.ones(K.shape[0], K.shape[1], 1, D, dtype=torch.bool)
        zero.scatter_(-1, layer.channels[:, :, None], False)
        ref_cache.layers[i].keys = K.masked_fill(zero, 0.0)
    ref = m(ids[:, 14:], cache=ref_cache).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@torch.no_grad()
def test_composed_token_and_channel_press(models):
    m, ids = models["llama"], prompt(1, 20)
    with kv.press(m, kv.Compose(kv.SnapKV(0.5, window=4), kv.ThinK(0.25, window=4))) as s:
        cache = s.prefill(ids)
    D = cache.layers[0].head_dim
    assert (cache.kept_tokens() == 10).all()
    assert cache.layers[0].keys.shape == (2 * 10, D - D // 4)
    with kv.press(m, "snapkv+think", 0.5, window=4) as s:  # the same by name: half the tokens, half the key channels
        named = s.prefill(ids)
    assert (named.kept_tokens() == 10).all()
    assert named.layers[0].keys.shape == (2 * 10, D - D // 2) and named.layers[0].values.shape[-1] == D


@torch.no_grad()
def test_query_agnostic_cache_is_reused_unchanged(models):
    m = models["llama"]
    context, q1, q2 = prompt(1, 20), prompt(1, 4, seed=8), prompt(1, 4, seed=9)
    with kv.press(m, "snapkv", 0.5, window=4) as s:
        cache = s.prefill(context)
        before = [layer.keys.clone() for layer in cache.layers]
        a1 = m(q1, cache=cache.copy()).logits
        a2 = m(q2, cache=cache.copy()).logits
        b2 = m(q2, cache=s.prefill(context)).logits  # compressing again gives the same answer
        gen = m.generate(torch.cat([context, q1], 1), cache=cache.copy(), max_new_tokens=3, do_sample=False)
    assert all(torch.equal(b, layer.keys) for b, layer in zip(before, cache.layers))
    torch.testing.assert_close(a2, b2, rtol=0, atol=0)
    assert not torch.allclose(a1[:, -1], a2[:, -1])
    assert gen[0, -3].item() == a1[0, -1].argmax().item()  # generate continued the same compressed cache


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "opt"])
def test_h2o_accumulates_exact_attention(family):
    # Checks the press-side queries (projection, QK-norm, RoPE, scaling) against the model's own attention.
    m = tiny(family, attn_implementation="eager")
    ids = prompt(1, 12)
    with torch.no_grad():
        att = m(ids, output_attentions=True).attentions  # per layer (1, H_q, T, T)
        with kv.press(m, "h2o", 0.0) as s:
            cache = s.prefill(ids)
    for i, layer in enumerate(cache.layers):
        H = layer.lengths.shape[1]
        ref = att[i][0].sum(1).view(H, -1, 12).sum(1)  # sum over queries, then over each group's heads
        torch.testing.assert_close(layer.state["acc"].view(H, 12), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value_norm", [False, True])
@torch.no_grad()
def test_observed_attention_is_mean_attention_per_query_that_saw_the_token(value_norm):
    m = tiny("llama", attn_implementation="eager")
    ids = prompt(1, 12)
    att = m(ids, output_attentions=True).attentions  # per layer (1, H_q, T, T)
    with kv.press(m, "vatp" if value_norm else "observed-attention", 0.5) as s:
        cache = s.prefill(ids)
    for i, layer in enumerate(cache.layers):
        H = layer.lengths.shape[1]
        mean = att[i][0].sum(1).view(H, -1, 12).sum(1) / torch.arange(12, 0, -1)  # token j seen by T - j queries
        ref = DynamicCache(config=m.config)
        m(ids, cache=ref)
        if value_norm:
            mean = mean * ref.layers[i].values[0].norm(dim=-1)  # (H, 12)
        keep = mean.topk(6, dim=-1).indices.sort(-1).values  # (H, 6)
        K = ref.layers[i].keys[0].gather(1, keep[..., None].expand(-1, -1, layer.head_dim))  # (H, 6, D)
        torch.testing.assert_close(layer.dense()[0][0], K, rtol=0, atol=1e-6)


@torch.no_grad()
def test_future_rotation_is_the_mean_rope_of_the_next_positions(models):
    # Expected attention rotates query statistics by RoPE averaged over the next n positions; check it
    # against the model's own rotary embedding applied position by position.
    m = models["llama"]
    T, n, D = 10, 7, m.config.hidden_size // m.config.num_attention_heads
    x = torch.randn(1, 1, D)
    cos, sin = m.model.rotary_emb(x, torch.arange(T)[None])  # (1, T, D)
    obs = kv.Observation(0, 1, torch.zeros(1, 1, T, D), torch.zeros(1, 1, T, D), torch.ones(1, 1, T, dtype=torch.bool),
                         T, torch.ones(1, T, dtype=torch.bool), torch.zeros(1, T, 8), None, (cos, sin))
    c, s = obs.future_rotation(n)  # (1, D)
    fc, fs = m.model.rotary_emb(x, torch.arange(T, T + n)[None])  # (1, n, D)
    ref = (x * fc + rotate_half(x) * fs).mean(1)  # (1, D)
    torch.testing.assert_close(x[:, 0] * c + rotate_half(x[:, 0]) * s, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_rolling_memory_is_attention_free_and_drops_the_most_typical_keys(models, family, monkeypatch):
    def no_queries(*a, **k):
        raise AssertionError("the rolling memory must not compute queries or attention")

    monkeypatch.setattr(kv.Observation, "queries", no_queries)
    monkeypatch.setattr(kv.Observation, "attention", no_queries)
    m, ids = models[family], prompt(1, 20)
    full = DynamicCache(config=m.config)
    m(ids, cache=full)
    with kv.press(m, "rolling", 0.5, n_anchor=2, recent=3) as s:
        cache = s.prefill(ids)
        for i, layer in enumerate(cache.layers):
            K = full.layers[i].keys[0]  # (H, 20, D) naive reference: cosine to the mean unit key
            u = K / K.norm(dim=-1, keepdim=True)
            cos = (u * u.mean(1, keepdim=True)).sum(-1) / u.mean(1, keepdim=True).norm(dim=-1)  # (H, 20)
            cos[:, :2] = cos[:, -3:] = -float("inf")  # anchor and recent always stay
            keep = (-cos).topk(10, dim=-1).indices.sort(-1).values  # (H, 10)
            ref = K.gather(1, keep[..., None].expand(-1, -1, K.shape[-1]))
            torch.testing.assert_close(layer.dense()[0][0], ref, rtol=0, atol=1e-6)
        # rolling: decoding under a budget stays bounded, anchor and newest tokens in it
        out = m.generate(ids, max_new_tokens=6, do_sample=False, cache=s.new_cache(), return_dict_in_generate=True,
                         pad_token_id=0)
    assert (out.cache.kept_tokens() == 10 + 5).all()
    with kv.press(m, "rolling", 0.5, decode_budget=10, n_anchor=2, recent=3) as s:
        out = m.generate(ids, max_new_tokens=6, do_sample=False, cache=s.new_cache(), return_dict_in_generate=True,
                         pad_token_id=0)
    assert (out.cache.kept_tokens() == 10).all()
    seq = out.sequences
    full = DynamicCache(config=m.config)
    m(seq[:, :-1], cache=full)
    K, held = full.layers[0].keys[0], out.cache.layers[0].dense()[0][0]  # (H, 25, D), (H, 10, D)
    torch.testing.assert_close(held[:, :2], K[:, :2], rtol=0, atol=1e-5)  # the anchor
    torch.testing.assert_close(held[:, -3:], K[:, -3:], rtol=0, atol=1e-5)  # the newest tokens


@torch.no_grad()
def test_context_manager_leaves_model_exactly_as_before(models):
    m, ids = models["llama"], prompt(1, 16)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    before = m(ids).logits
    with pytest.raises(RuntimeError, match="boom"):
        with kv.press(m, "snapkv", 0.5, window=4):
            m(ids)
            raise RuntimeError("boom")
    for mod in m.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    out = m(ids)
    torch.testing.assert_close(out.logits, before, rtol=0, atol=0)
    assert type(out.cache) is DynamicCache


def test_clear_errors(models):
    m = models["llama"]
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="ratio must be in"):
            with kv.press(m, "snapkv", bad):
                pass
    with pytest.raises(KeyError, match="Did you mean 'snapkv'"):
        kv.build_press("snapvk", 0.5)
    with pytest.raises(ValueError, match="decode_budget"):
        with kv.press(m, "tova", 0.5, decode_budget=0):
            pass
    with pytest.raises(ValueError, match="no setting 'windw'"):
        kv.build_press("snapkv", 0.5, windw=3)
    with pytest.raises(UnsupportedModelError, match="KV presses need a decoder"):
        with kv.press(tiny("bert"), "snapkv", 0.5):
            pass
    c = DynamicCache(config=m.config)
    with torch.no_grad():
        m(prompt(1, 4), cache=c)
    with pytest.raises(ValueError, match="needs its own cache"):
        with kv.press(m, "snapkv", 0.5), torch.no_grad():
            m(prompt(1, 4), cache=c)


def test_cli_rejects_bad_press_before_loading():
    from trimformer.cli import main

    assert main(["generate", "--model", "no-such-model", "--press", "snapvk", "--prompt", "hi"]) == 2
    assert main(["generate", "--model", "no-such-model", "--press", "snapkv", "--ratio", "1.2", "--prompt", "hi"]) == 2


def test_per_layer_budget_keeps_more_in_lower_layers(models):
    m, ids = models["llama"], prompt(1, 40)
    with kv.press(m, kv.PerLayer(kv.KeyNorm(), ratio=0.5, spread=0.5)) as s:
        cache = s.prefill(ids)
    kept = cache.kept_tokens()[:, 0, 0].tolist()  # per layer
    assert kept == [30, 10]  # spread 0.5 around the mean kept share 0.5: 0.75 and 0.25 of 40
