"""Token pruning / merging at inference on tiny random BERT, ViT and LLaMA models."""

from __future__ import annotations

import math

import pytest
import torch

from trimformer import tokens
from trimformer.models import anatomy_of
from trimformer.tokens.merge import bipartite_soft_matching

ENCODER_METHODS = ["zero-tprune", "merge", "transform", "acc"]
L = 4  # blocks in the test models


@pytest.fixture(scope="module")
def batch():
    """(3, 24) token ids with right padding: rows of 24, 17 and 9 real tokens."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    mask[2, 9:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def left_batch():
    """(3, 20) token ids with left padding (decoders): rows of 20, 15 and 9 real tokens."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 128, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    return ids, mask


def hidden(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def hook_ids(model) -> set[int]:
    """Ids of every forward (pre-)hook on the model (transformers may keep some of its own)."""
    return {k for m in model.modules() for d in (m._forward_pre_hooks, m._forward_hooks) for k in d}


# -- equivalences ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ENCODER_METHODS)
def test_keep_one_changes_nothing(bert, vit, batch, name):
    ids, mask = batch
    ref = hidden(bert, ids, mask)
    with tokens.prune(bert, name, keep=1.0) as s:
        out = hidden(bert, ids, mask)
    assert s.counts == [[24, 17, 9]] * L
    assert torch.equal(out, ref)
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = vit(pixel_values=px).logits
        with tokens.prune(vit, name, keep=1.0):
            assert torch.equal(vit(pixel_values=px).logits, ref)


def test_lazy_keep_one_changes_nothing(llama, left_batch):
    ids, mask = left_batch
    g = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    ref = llama.generate(input_ids=ids, attention_mask=mask, **g)
    with tokens.prune(llama, "lazy", keep=1.0):
        assert torch.equal(llama.generate(input_ids=ids, attention_mask=mask, **g), ref)


@pytest.mark.parametrize("name", ENCODER_METHODS)
@pytest.mark.parametrize("recover", [None, L])
def test_padded_batch_equals_rows(bert, batch, name, recover):
    ids, mask = batch
    with tokens.prune(bert, name, keep=0.3, recover=recover) as s:
        out = hidden(bert, ids, mask)
        kept = s.state.valid.sum(1).tolist()
        for b in range(3):
            n = int(mask[b].sum())
            row = hidden(bert, ids[b:b + 1, :n])[0]
            if recover is None:  # the row's surviving slots come first, then fillers
                torch.testing.assert_close(out[b, :kept[b]], row, atol=1e-5, rtol=1e-4)
            else:
                torch.testing.assert_close(out[b, :n], row, atol=1e-5, rtol=1e-4)


def test_lazy_padded_batch_equals_rows(llama, left_batch):
    """Prefill, a 3-token continuation on the pruned cache, and greedy decoding: batch == each row alone."""
    ids, mask = left_batch
    nxt = torch.randint(3, 128, (3, 3), generator=torch.Generator().manual_seed(5))
    g = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad(), tokens.prune(llama, "lazy", keep=0.3, start=1) as s:
        pre = llama(input_ids=ids, attention_mask=mask, use_cache=True)
        assert s.counts[-1] == [math.ceil(n * 0.3) for n in (20, 15, 9)]
        cont = llama(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), cache=pre.past_key_values)
        gen = llama.generate(input_ids=ids, attention_mask=mask, **g)
        for b in range(3):
            n = int(mask[b].sum())
            row = ids[b:b + 1, -n:]
            p = llama(input_ids=row, use_cache=True)
            torch.testing.assert_close(pre.logits[b, -1], p.logits[0, -1], atol=1e-5, rtol=1e-4)
            c = llama(input_ids=nxt[b:b + 1], cache=p.past_key_values)
            torch.testing.assert_close(cont.logits[b], c.logits[0], atol=1e-5, rtol=1e-4)
            # one token at a time on the same pruned cache gives the same as three at once
            cache, steps = llama(input_ids=row, use_cache=True).past_key_values, []
            for j in range(3):
                o = llama(input_ids=nxt[b:b + 1, j:j + 1], cache=cache)
                cache = o.past_key_values
                steps.append(o.logits[0, -1])
            torch.testing.assert_close(torch.stack(steps), c.logits[0], atol=1e-5, rtol=1e-4)
            assert torch.equal(gen[b, 20:], llama.generate(input_ids=row, **g)[0, n:])


# -- schedules, [CLS], shapes ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ENCODER_METHODS)
def test_tokens_per_block_follow_schedule(bert, batch, name):
    ids, mask = batch
    schedule = [1.0, 0.8, 0.6, 0.45]
    shapes: list[tuple[int, ...]] = []
    with tokens.prune(bert, name, schedule=schedule) as s:  # a spy after the pruner's hooks sees the block input
        spy = [b.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape))) for b in bert.encoder.layer]
        try:
            hidden(bert, ids, mask)
        finally:
            for h in spy:
                h.remove()
    want = [[math.ceil(n * f - 1e-6) for n in (24, 17, 9)] for f in schedule]
    assert s.counts == want
    assert [t[1] for t in shapes] == [max(w) for w in want]  # physically dropped: the tensors shrink
    f = s.flops()
    assert 0.5 < f["ratio"] < 0.85 and f["pruned"] < f["dense"]


def test_geometric_keep_reaches_last_block(bert):
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(6))
    with tokens.prune(bert, "zero-tprune", keep=0.25, start=1) as s:
        hidden(bert, ids)
    assert s.counts[0] == [40, 40] and s.counts[-1] == [10, 10]
    assert all(a[0] > b[0] for a, b in zip(s.counts[1:], s.counts[2:]))


@pytest.mark.parametrize("name", ENCODER_METHODS)
def test_cls_never_pruned(bert, vit, batch, name):
    ids, mask = batch
    with tokens.prune(bert, name, keep=0.1) as s:
        hidden(bert, ids, mask)
        assert (s.state.index[:, 0] == 0).all()
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), tokens.prune(vit, name, keep=0.1) as s:
        vit(pixel_values=px)
        assert (s.state.index[:, 0] == 0).all() and s.counts[-1][0] < 65


@pytest.mark.parametrize("name", ENCODER_METHODS)
def test_recover_returns_full_length(bert, vit, batch, name):
    ids, mask = batch
    with tokens.prune(bert, name, keep=0.3, recover=L) as s:
        out = hidden(bert, ids, mask)
    assert out.shape == (3, 24, 64) and s.counts[-1][0] < 24
    with tokens.prune(bert, name, keep=0.3, start=1, recover=2) as s:  # prune in block 1, full from 2 on
        out = hidden(bert, ids, mask)
    assert out.shape == (3, 24, 64) and s.counts[1][0] < 24 and s.counts[2:] == [[24, 17, 9]] * 2
    with torch.no_grad(), tokens.prune(vit, name, keep=0.3, recover=L):
        assert vit.vit(pixel_values=torch.randn(1, 3, 32, 32)).last_hidden_state.shape == (1, 65, 64)


def test_merge_recover_keeps_mean_pooling(bert):
    """Merged tokens copy their group's output: the mean over all tokens is the size-weighted mean."""
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(7))
    with tokens.prune(bert, "merge", keep=0.5) as s:
        short = hidden(bert, ids)
        sizes = s.state.sizes
    assert sizes.sum().item() == 30
    with tokens.prune(bert, "merge", keep=0.5, recover=L):
        full = hidden(bert, ids)
    weighted = (short * sizes[..., None]).sum(1) / sizes.sum()
    torch.testing.assert_close(full.mean(1), weighted, atol=1e-5, rtol=1e-4)


def test_fill_skip_restores_state_at_drop(bert):
    """fill="skip": a dropped token comes back with the state it had when dropped (it skipped blocks)."""
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(10))
    schedule = [1.0, 0.5, 0.5, 0.5]
    with tokens.prune(bert, "zero-tprune", schedule=schedule) as s:
        hidden(bert, ids)
        kept = set(s.state.index[0].tolist())
    with torch.no_grad():
        before_block1 = bert(input_ids=ids, output_hidden_states=True).hidden_states[1][0]  # (T, H)
    with tokens.prune(bert, "zero-tprune", schedule=schedule, recover=L, fill="skip"):
        out = hidden(bert, ids)[0]
    dropped = [t for t in range(30) if t not in kept]
    assert len(dropped) == 15
    torch.testing.assert_close(out[dropped], before_block1[dropped], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out[sorted(kept)], before_block1[sorted(kept)], atol=1e-3)


def test_cli_errors_before_loading(capsys):
    from trimformer.cli import main

    assert main(["bench-tokens", "--methods", "merg"]) == 2
    assert "Did you mean 'merge'" in capsys.readouterr().err
    assert main(["bench-tokens", "--keep", "0.5,abc"]) == 2
    assert "expected comma-separated numbers" in capsys.readouterr().err


def test_bipartite_matching_merges_duplicates():
    g = torch.Generator().manual_seed(8)
    base = torch.randn(1, 4, 16, generator=g)
    feat = torch.randn(1, 8, 16, generator=g)
    feat[0, 2], feat[0, 6] = base[0, 0], base[0, 1]  # A token 2 duplicates B token 3, A 6 duplicates B 7
    feat[0, 3], feat[0, 7] = base[0, 0], base[0, 1]
    valid = torch.ones(1, 8, dtype=torch.bool)
    protected = torch.zeros(1, 8, dtype=torch.bool)
    merged, into = bipartite_soft_matching(feat, torch.tensor([2]), valid, protected)
    assert merged[0].nonzero().flatten().tolist() == [2, 6]
    assert into[0, 2].item() == 3 and into[0, 6].item() == 7
    protected[0, 2] = True
    merged, _ = bipartite_soft_matching(feat, torch.tensor([2]), valid, protected)
    assert not merged[0, 2]


def test_lazy_prunes_prefill(llama):
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), tokens.prune(llama, "lazy", keep=0.25, start=2) as s:
        out = llama(input_ids=ids, use_cache=True)
        assert s.counts[0] == [40] and s.counts[1] == [40] and s.counts[-1] == [10]
        assert out.past_key_values.layers[-1].keys.shape[2] == 10  # the last layer cached only its tokens
        assert (s.state.index[0, -1] == 39) and (s.state.index[0, 0] == 0)  # last position and sink kept
        assert s.flops()["ratio"] < 0.8


def test_acc_solves_schedule_for_speedup(bert, monkeypatch):
    """With block time proportional to tokens, the solved schedule's time is dense / speedup."""
    from trimformer.tokens import acc

    monkeypatch.setattr(acc, "measure_block", lambda anatomy, tokens, batch: [f for f in acc.GRID])
    monkeypatch.setattr(acc, "measure_decision", lambda anatomy, tokens, batch: [0.0] * len(acc.GRID))
    m = tokens.build("acc", {"speedup": 1.6})
    with tokens.prune(bert, m) as s:
        hidden(bert, torch.randint(3, 128, (1, 40)))
    assert m.solved[0] == 1.0 and all(a > b for a, b in zip(m.solved, m.solved[1:]))
    assert sum(m.solved) == pytest.approx(L / 1.6, rel=1e-3)
    assert s.counts[-1][0] == math.ceil(40 * m.solved[-1] - 1e-6)
    monkeypatch.setattr(acc, "measure_block", lambda anatomy, tokens, batch: [1.0] * len(acc.GRID))
    with pytest.raises(ValueError, match="speedup=1.6 is out of reach"):
        with tokens.prune(bert, "acc", speedup=1.6):
            pass


def test_acc_speedup_pays_for_its_own_decisions(bert, monkeypatch):
    """Each cut costs a decision on the tokens entering it (here 0.3 of a block per token share): the solved
    schedule's blocks plus decisions take dense / speedup, so it keeps fewer tokens than without them."""
    from trimformer.tokens import acc

    monkeypatch.setattr(acc, "measure_block", lambda anatomy, tokens, batch: list(acc.GRID))
    monkeypatch.setattr(acc, "measure_decision", lambda anatomy, tokens, batch: [0.3 * f for f in acc.GRID])
    m = tokens.build("acc", {"speedup": 1.25})
    with tokens.prune(bert, m):
        hidden(bert, torch.randint(3, 128, (1, 40)))
    f = m.solved
    assert sum(f) + sum(0.3 * f[i - 1] for i in range(1, L)) == pytest.approx(L / 1.25, rel=1e-3)
    assert sum(f) < L / 1.25 - 0.5
    t = acc.measure_decision(anatomy_of(bert), 64, 2)  # the real measurement runs and is positive
    assert len(t) == len(acc.GRID) and all(x > 0 for x in t)


def test_acc_measures_real_block_latency(bert):
    from trimformer.models import anatomy_of
    from trimformer.tokens.acc import GRID, measure_block

    t = measure_block(anatomy_of(bert), 256, 16)  # seconds at GRID shares 1.0 ... 0.1 of 256 tokens
    assert len(t) == len(GRID) == 5
    # the grid shows cost growing with tokens: a tenth of the tokens takes less than the full length (minimum of
    # round-robin repetitions, so load from other processes hits both alike; 2-4x on a quiet machine)
    assert t[0] > 1.2 * t[-1]


# -- the context manager and errors -------------------------------------------------------------------
def test_model_restored_even_after_error(bert, batch):
    ids, mask = batch
    ref = hidden(bert, ids, mask)
    before = hook_ids(bert)
    with pytest.raises(RuntimeError, match="boom"):
        with tokens.prune(bert, "zero-tprune", keep=0.3):
            hidden(bert, ids, mask)
            raise RuntimeError("boom")
    assert hook_ids(bert) == before
    assert torch.equal(hidden(bert, ids, mask), ref)


def test_deterministic(bert, batch):
    ids, mask = batch
    outs = []
    for _ in range(2):
        with tokens.prune(bert, "zero-tprune", keep=0.3, recover=L):
            outs.append(hidden(bert, ids, mask))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("zero-tprune", {"keep": 0.0}, "keep=0.0 must be in"),
        ("merge", {"keep": 1.5}, "keep=1.5 must be in"),
        ("acc", {"start": 0}, "start=0 must be >= 1"),
        ("zero-tprune", {"schedule": [1.0, 0.5]}, "schedule has 2 values, the model has 4 blocks"),
        ("zero-tprune", {"schedule": [1.0, 0.5, 0.7, 0.5]}, "must not increase"),
        ("merge", {"recover": 9}, "recover=9 must be a block index"),
        ("zero-tprune", {"start": 4, "keep": 0.5}, "start=4 but the model has only 4 blocks"),
        ("acc", {"speedup": 0.5}, "speedup=0.5 must be >= 1"),
        ("merge", {"r": -1}, "r=-1 must be >= 0"),
        ("merge", {"fill": "zeros"}, "merge: fill='zeros': choose one of 'copy', 'skip', 'delta'"),
        ("lazy", {}, "is for decoder LLM prefill"),
        ("zero-tprune", {"kepp": 0.5}, "Did you mean 'keep'"),
    ],
)
def test_bad_arguments(bert, name, settings, message):
    before = hook_ids(bert)
    with pytest.raises(ValueError, match=message):
        with tokens.prune(bert, name, **settings):
            pass
    assert hook_ids(bert) == before


def test_unknown_method_and_wrong_family(bert, llama):
    with pytest.raises(KeyError, match="Did you mean 'merge'"):
        with tokens.prune(bert, "merg"):
            pass
    with pytest.raises(ValueError, match="is for encoders and ViTs"):
        with tokens.prune(llama, "zero-tprune"):
            pass


# -- content-based progressive pruning ---------------------------------------------------------------
def test_coverage_keeps_what_the_content_needs(bert, batch):
    ids, mask = batch
    ref = hidden(bert, ids, mask)
    with tokens.prune(bert, "coverage", mass=1.0) as s:  # all the attention: every real token stays
        out = hidden(bert, ids, mask)
    for b, n in enumerate((24, 17, 9)):  # (padding slots are dropped: what they hold is filler)
        torch.testing.assert_close(out[b, :n], ref[b, :n], atol=1e-5, rtol=1e-5)
    assert s.counts == [[24, 17, 9]] * L
    counts = {}
    for mass in (0.5, 0.8):
        with tokens.prune(bert, "coverage", mass=mass) as s:
            out = hidden(bert, ids, mask)
            assert (s.state.index[:, 0] == 0).all()  # [CLS] stays
            kept = s.state.valid.sum(1).tolist()
        counts[mass] = s.counts
        assert s.counts[0] == [24, 17, 9] and s.counts[-1][0] < 24
        assert all(b <= a for r0, r1 in zip(s.counts, s.counts[1:]) for a, b in zip(r0, r1))  # progressive
        for b in range(3):  # per-row counts: a padded batch equals each row alone
            n = int(mask[b].sum())
            with tokens.prune(bert, "coverage", mass=mass) as one:
                row = hidden(bert, ids[b:b + 1, :n])[0]
            assert [c[0] for c in one.counts] == [c[b] for c in s.counts]
            torch.testing.assert_close(out[b, :kept[b]], row, atol=1e-5, rtol=1e-4)
    assert all(a <= b for a, b in zip(counts[0.5][1], counts[0.8][1]))  # more mass, more tokens (same block-1 scores)
    with tokens.prune(bert, "coverage", mass=0.5, keep=0.9) as s:  # the schedule is a floor
        hidden(bert, ids, mask)
    assert s.counts[-1] == [math.ceil(n * 0.9 - 1e-6) for n in (24, 17, 9)]
    with pytest.raises(ValueError, match="mass"):
        tokens.build("coverage", {"mass": 0})
