"""LazyLLM revival (Aux Cache) on a tiny LLaMA: exact against a dense forward with per-layer masks."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny

from trimformer import anatomy_of, tokens

L = 4


def ids_of(n: int, seed: int, rows: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (rows, n), generator=torch.Generator().manual_seed(seed))


def masked_forward(model, ids: torch.Tensor, attend: list[torch.Tensor]) -> torch.Tensor:
    """Logits (T, V) of a full forward in which block l's queries see only keys attend[l] (T, T) allows."""
    hooks = []
    for layer, allow in zip(model.model.layers, attend):
        m = torch.zeros(allow.shape).masked_fill(~allow, torch.finfo(torch.float32).min)[None, None]

        def pre(_mod, args, kwargs, m=m):
            return args, {**kwargs, "attention_mask": m}

        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            return model(input_ids=ids).logits[0]
    finally:
        for h in hooks:
            h.remove()


def reference_masks(before: dict, after: dict, n: int) -> list[torch.Tensor]:
    """What each block's queries attend to with revival: a token prefill kept at layer l saw the tokens
    kept there; a revived token (and the new one) sees every token layer l holds after the step."""
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    masks = []
    for layer in range(L):
        kept = torch.zeros(n, dtype=torch.bool)
        kept[before[layer][0][before[layer][0] >= 0]] = True
        held = torch.zeros(n, dtype=torch.bool)
        held[after[layer][0][after[layer][0] >= 0]] = True
        rows = torch.where(kept[:, None], kept[None, :], held[None, :]) & causal
        rows |= torch.eye(n, dtype=torch.bool)  # tokens no one holds: any finite row (unused)
        masks.append(rows)
    return masks


@pytest.mark.parametrize("revive", [False, True])
def test_decode_step_matches_masked_dense_forward(llama, revive):
    """Prefill prunes, one decoding step (with or without revival) = a dense forward whose per-layer
    masks say who saw whom: the cache bookkeeping, positions and revived states are all exact."""
    ids = ids_of(30, 1)
    nxt = ids_of(1, 2)
    with torch.no_grad(), tokens.prune(llama, "lazy", keep=0.2, start=1, revive=revive) as s:
        pre = llama(input_ids=ids, use_cache=True)
        before = {k: v.clone() for k, v in s.kv_index.items()}
        step = llama(input_ids=nxt, cache=pre.past_key_values)
        after = {k: v.clone() for k, v in s.kv_index.items()}
        revived = dict(s.aux.revived) if s.aux else {}
    full = torch.cat([ids, nxt], 1)
    ref = masked_forward(llama, full, reference_masks(before, after, 31))
    torch.testing.assert_close(step.logits[0, -1], ref[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pre.logits[0, -1], ref[-2], atol=1e-4, rtol=1e-4)
    grew = [int((after[i] >= 0).sum()) - int((before[i] >= 0).sum()) - 1 for i in range(L)]
    if revive:
        assert sum(revived.values()) > 0 and grew[1:] == [revived.get(i, 0) for i in range(1, L)]
    else:
        assert grew == [0] * L


def test_revival_keep_one_and_generation(llama):
    """keep=1: nothing to revive, generation equals dense; with revival generation runs and each
    layer's cache only grows by the tokens revived plus the ones generated."""
    ids = ids_of(24, 3)
    g = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    ref = llama.generate(input_ids=ids, **g)
    with tokens.prune(llama, "lazy", keep=1.0, revive=True):
        assert torch.equal(llama.generate(input_ids=ids, **g), ref)
    with tokens.prune(llama, "lazy", keep=0.2, start=1, revive=True) as s:
        out = llama.generate(input_ids=ids, **g)
        sizes = {i: int((ix >= 0).sum()) for i, ix in s.kv_index.items()}
    assert out.shape == ref.shape and torch.equal(out[:, :24], ids)
    assert sum(s.aux.revived.values()) > 0
    for i in range(1, L):  # prefill kept ceil(24 * share); the cache gained revived + 4 decoded tokens
        kept = int(s.method.targets(i, L, torch.tensor([24]))[0])
        assert sizes[i] == kept + s.aux.revived.get(i, 0) + 4


def test_revival_padded_batch_equals_rows(llama):
    """Left padding: each row of a revived batch decodes as the row alone."""
    ids = ids_of(20, 4, rows=3)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    mask[2, :11] = 0
    g = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with tokens.prune(llama, "lazy", keep=0.25, start=1, revive=True):
        gen = llama.generate(input_ids=ids, attention_mask=mask, **g)
        for b in range(3):
            n = int(mask[b].sum())
            row = llama.generate(input_ids=ids[b:b + 1, -n:], **g)
            assert torch.equal(gen[b, 20:], row[0, n:])


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gpt2", "opt"])
def test_revival_other_decoders_batch_equals_rows(family):
    """Revival across adapters (positional cache / mask on GPT-2, no RoPE on GPT-2 / OPT): each row
    of a left-padded batch generates as the row alone; GPT-2 needs full length restored at the end."""
    model = tiny(family).eval()
    L_ = len(anatomy_of(model).blocks)
    ids = torch.randint(3, 100, (2, 30), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    g = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    extra = {"recover": L_, "fill": "skip"} if family == "gpt2" else {}
    if family == "gpt2":
        with pytest.raises(ValueError, match="pass recover="):
            with tokens.prune(model, "lazy", keep=0.2, start=1):
                pass
    with tokens.prune(model, "lazy", keep=0.2, start=1, revive=True, **extra) as s:
        out = model.generate(input_ids=ids, attention_mask=mask, **g)
        revived = sum(s.aux.revived.values())
        for b in range(2):
            n = int(mask[b].sum())
            assert torch.equal(out[b, -3:], model.generate(input_ids=ids[b:b + 1, -n:], **g)[0, -3:])
    assert revived > 0
