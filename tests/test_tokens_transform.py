"""Many-to-many Token Transforming, residual unmerge (fill="delta") and the FLOPs target, on a tiny BERT."""

from __future__ import annotations

import pytest
import torch

from trimformer import tokens
from trimformer.tokens.base import Context

L = 4


def hidden(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_hidden_states=True)


def ids_of(n: int, seed: int, rows: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (rows, n), generator=torch.Generator().manual_seed(seed))


def context(x: torch.Tensor, target: int) -> Context:
    B, T_, _ = x.shape
    valid = torch.ones(B, T_, dtype=torch.bool)
    protected = torch.zeros(B, T_, dtype=torch.bool)
    protected[:, 0] = protected[:, -1] = True
    return Context(1, x, None, None, valid, protected, torch.ones(B, T_), torch.full((B,), target), False)


def test_transform_plan_is_many_to_many():
    """Kept tokens map to themselves; each removed token splits over up to `neighbours` kept slots."""
    x = torch.randn(2, 20, 16, generator=torch.Generator().manual_seed(1))
    method = tokens.build("transform", {"neighbours": 3, "tau": 0.5, "features": "hidden"})
    ctx = context(x, 12)
    ctx.flops = 0.0
    plan = method.plan(ctx, recover=True)
    W = plan.weights  # (B, T, T')
    assert W.shape == (2, 20, 12) and plan.slot_valid.all()
    torch.testing.assert_close(W.sum(-1), torch.ones(2, 20))
    kept = torch.zeros(2, 20, dtype=torch.bool).scatter(1, plan.keep, True)
    assert kept[:, 0].all() and kept[:, -1].all()  # [CLS] / [SEP] stay
    for b in range(2):
        for t in range(20):
            nz = (W[b, t] > 0).sum().item()
            assert nz == 1 if kept[b, t] else 1 <= nz <= 3
        assert (W[b][kept[b]] == 1).sum().item() == 12  # one-hot rows for the kept tokens
    assert ((W > 0).sum(-1) > 1).any()  # some removed token really is shared
    assert ctx.flops > 0


def test_transform_mass_and_mean_pooling(bert):
    """Slot masses add up to the row; recovery after the last block gives each token its mixture, so
    the mean over tokens is the mass-weighted mean of the slots."""
    ids = ids_of(30, 7)
    with tokens.prune(bert, "transform", keep=0.4) as s:
        short = hidden(bert, ids).last_hidden_state
        sizes = s.state.sizes
    torch.testing.assert_close(sizes.sum(), torch.tensor(30.0))
    assert s.counts[-1] == [12]
    with tokens.prune(bert, "transform", keep=0.4, recover=L):
        full = hidden(bert, ids).last_hidden_state
    assert full.shape == (1, 30, 64)
    weighted = (short * sizes[..., None]).sum(1) / sizes.sum()
    torch.testing.assert_close(full.mean(1), weighted, atol=1e-5, rtol=1e-4)


def test_transform_one_neighbour_is_hard_merge(bert):
    """neighbours=1: every removed token goes wholly to one slot (sizes are whole numbers)."""
    with tokens.prune(bert, "transform", keep=0.4, neighbours=1) as s:
        hidden(bert, ids_of(30, 8))
    sizes = s.state.sizes
    torch.testing.assert_close(sizes, sizes.round())


@pytest.mark.parametrize("name", ["merge", "transform", "zero-tprune"])
def test_fill_delta_keeps_mean_pooling_of_copy(bert, name):
    """Offsets within every group sum to zero: after the last block, delta and copy pool alike."""
    ids = ids_of(30, 9)
    outs = {}
    for fill in ("copy", "delta"):
        with tokens.prune(bert, name, keep=0.4, recover=L, fill=fill):
            outs[fill] = hidden(bert, ids).last_hidden_state
    if name == "zero-tprune":  # pruned tokens keep their own offset: the mean moves, the shape stays
        assert outs["delta"].shape == outs["copy"].shape
        assert not torch.allclose(outs["delta"], outs["copy"])
    else:
        torch.testing.assert_close(outs["delta"].mean(1), outs["copy"].mean(1), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(outs["delta"], outs["copy"], atol=1e-4)


def test_fill_delta_is_own_state_plus_stand_in_update(bert):
    """A token pruned at block 1 returns as its state then plus the update its stand-in got since."""
    ids = ids_of(30, 10)
    schedule = [1.0, 0.5, 0.5, 0.5]
    h1 = hidden(bert, ids).hidden_states[1][0]  # (T, H) input of block 1 (unpruned before it)
    with tokens.prune(bert, "zero-tprune", schedule=schedule) as s:
        hidden(bert, ids)
        kept = s.state.index[0].tolist()
    with tokens.prune(bert, "zero-tprune", schedule=schedule, recover=L, fill="delta"):
        out = hidden(bert, ids).last_hidden_state[0]
    update = out - h1  # (T, H) what the blocks added to each token
    dropped = [t for t in range(30) if t not in kept]
    assert len(dropped) == 15
    for t in dropped:  # equal to some kept token's update
        err = (update[kept] - update[t]).abs().amax(-1)
        assert err.min().item() < 1e-4


def test_delta_recovery_before_a_later_block(bert):
    """Recovery before block 3 with fill="delta": full length from block 3 on, and keep=1 is exact."""
    ids, mask = ids_of(24, 11, rows=2), torch.ones(2, 24, dtype=torch.long)
    mask[1, 15:] = 0
    ref = hidden(bert, ids, mask).last_hidden_state
    with tokens.prune(bert, "merge", schedule=[1.0, 0.6, 0.5, 1.0], recover=3, fill="delta") as s:
        out = hidden(bert, ids, mask).last_hidden_state
    assert s.counts == [[24, 15], [15, 9], [12, 8], [24, 15]]
    assert out.shape == ref.shape
    with tokens.prune(bert, "transform", keep=1.0, recover=3, fill="delta"):  # padding outputs are not kept
        torch.testing.assert_close(hidden(bert, ids, mask).last_hidden_state[mask.bool()], ref[mask.bool()])


@pytest.mark.parametrize("name", ["merge", "transform", "zero-tprune"])
def test_flops_target_is_met(bert, name):
    """flops=0.6 solves keep: the blocks see 60 % of the tokens on average (the tokens-linear model);
    on this tiny model attention and scoring weigh more, so the counted ratio is only below dense."""
    ids = ids_of(120, 12, rows=2)
    method = tokens.build(name, {"flops": 0.6})
    with tokens.prune(bert, method) as s:
        hidden(bert, ids)
    assert 0.1 < method.keep < 0.6
    assert abs(sum(c[0] for c in s.counts) / (L * 120) - 0.6) < 0.02
    assert s.flops()["ratio"] < 0.75
    shares = [method.fraction(i, L) for i in range(L)]
    assert abs(sum(shares) / L - 0.6) < 1e-6


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("transform", {"tau": 0.0}, "tau=0.0 must be > 0"),
        ("transform", {"neighbours": 0}, "neighbours=0 must be >= 1"),
        ("merge", {"features": "values"}, "merge: features='values': choose one of 'keys', 'hidden'"),
        ("merge", {"threshold": 1.5}, "threshold=1.5 must be a cosine"),
        ("merge", {"flops": 1.5}, "flops=1.5 must be in"),
        ("merge", {"flops": 0.5, "schedule": [1, 1, 1, 1]}, "not both"),
        ("merge", {"flops": 0.3, "start": 3}, "flops=0.3 is out of reach"),
        ("transform", {"schedule": [1.0, 0.5, 0.6, 1.0], "recover": 3}, "must not increase"),
    ],
)
def test_bad_arguments(bert, name, settings, message):
    with pytest.raises(ValueError, match=message):
        with tokens.prune(bert, name, **settings):
            pass


def test_cli_flops_and_transform_errors_before_loading(capsys):
    from trimformer.cli import main

    assert main(["bench-tokens", "--methods", "transfrom"]) == 2
    assert "Did you mean 'transform'" in capsys.readouterr().err
    assert main(["bench-tokens", "--methods", "transform", "--flops", "0.6,abc"]) == 2
    assert "--flops '0.6,abc': expected comma-separated numbers" in capsys.readouterr().err


def test_threshold_merges_only_similar_pairs(bert):
    """threshold: duplicates merge, dissimilar pairs don't, whatever the schedule allows."""
    from trimformer.tokens.merge import bipartite_soft_matching

    g = torch.Generator().manual_seed(8)
    feat = torch.randn(1, 8, 16, generator=g)
    feat[0, 3], feat[0, 7] = feat[0, 2], feat[0, 6]  # A 2 = B 3, A 6 = B 7
    valid, protected = torch.ones(1, 8, dtype=torch.bool), torch.zeros(1, 8, dtype=torch.bool)
    merged, _ = bipartite_soft_matching(feat, torch.tensor([4]), valid, protected, threshold=0.99)
    assert merged[0].nonzero().flatten().tolist() == [2, 6]
    ids = ids_of(40, 13)
    with tokens.prune(bert, "merge", keep=0.05, threshold=1.0) as s:  # nothing is that similar
        hidden(bert, ids)
    assert s.counts == [[40]] * L
    with tokens.prune(bert, "merge", keep=0.05, threshold=-1.0) as s:  # everything may merge: the cap binds
        hidden(bert, ids)
    assert s.counts[1][0] < 40


@pytest.mark.parametrize("name", ["merge", "transform"])
def test_delta_and_threshold_padded_batch_equals_rows(bert, name):
    """Right padding: every row of a batch comes out as the row alone (delta recovery mid-stack,
    and content-adaptive threshold merging, whose counts differ per row)."""
    ids = ids_of(24, 14, rows=3)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    mask[2, 9:] = 0
    for settings in ({"schedule": [1.0, 0.6, 0.5, 1.0], "recover": 3, "fill": "delta"},
                     {"keep": 0.05, "threshold": 0.5, "recover": L, "features": "hidden"}):  # rows cut unevenly
        with tokens.prune(bert, name, **settings):
            out = hidden(bert, ids, mask).last_hidden_state
            for b in range(3):
                n = int(mask[b].sum())
                row = hidden(bert, ids[b:b + 1, :n]).last_hidden_state[0]
                torch.testing.assert_close(out[b, :n], row, atol=1e-5, rtol=1e-4)
