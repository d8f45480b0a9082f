"""True-sequential collection: sublayer shortcuts and the cached dense stream change no result, only the work."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny

import trimformer
from trimformer import calibrate
from trimformer.models import anatomy_of
from trimformer.weights import WEIGHTS, sequential


def _pruned(family: str, settings: dict, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    model = tiny(family)
    trimformer.prune_(model, WEIGHTS.build("sparsegpt", settings), calibration=calib, progress=False)
    return model.state_dict()


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("settings", [{"sparsity": 0.5}, {"sparsity": 0.5, "asymmetric": True}],
                         ids=["plain", "asymmetric"])
def test_shortcuts_leave_every_weight_bit_identical(family, settings, calib, monkeypatch):
    fast = _pruned(family, settings, calib)
    monkeypatch.setattr(sequential, "_shortcut", lambda *a: None)  # every pass re-runs the whole sublayer
    slow = _pruned(family, settings, calib)
    assert all(torch.equal(fast[k], slow[k]) for k in fast)


@pytest.mark.parametrize("family, expected", [("llama", {"attn", "mlp"}), ("gpt2", {"attn", "mlp"}), ("bert", set())])
def test_shortcut_only_where_the_sublayer_output_is_its_projection(family, expected, calib, monkeypatch):
    # BERT's attention and MLP modules add the residual and a LayerNorm after their output projection,
    # so replaying only the projection would be wrong there: the check must refuse it.
    made = []
    real = sequential._shortcut

    def spy(bc, sub, *rest):
        s = real(bc, sub, *rest)
        if s is not None:
            made.append("attn" if sub is bc.block.attention.module else "mlp")
        return s

    monkeypatch.setattr(sequential, "_shortcut", spy)
    model = tiny(family)
    trimformer.prune_(model, WEIGHTS.build("sparsegpt", {"sparsity": 0.5}), calibration=calib, progress=False)
    assert set(made) == expected
    if expected:
        assert len(made) == 2 * len(anatomy_of(model).blocks)


def test_attention_runs_twice_per_batch_not_once_per_stage(calib):
    # q/k/v pass (stops before attention) + o pass; gate/up, down and the final run replay the attention.
    model = tiny("llama")
    an = anatomy_of(model)
    calls = []
    hooks = [b.attention.q.module.register_forward_hook(lambda *_: calls.append(1)) for b in an.blocks]
    # plain: the asymmetric dense copy (a deepcopy, hooks included) would add its one forward per batch
    trimformer.prune_(model, WEIGHTS.build("sparsegpt", {"sparsity": 0.5, "asymmetric": False}), calibration=calib,
                      progress=False)
    for h in hooks:
        h.remove()
    assert len(calls) == 2 * len(an.blocks) * calib.shape[0]


def test_dense_stream_is_run_once_per_block_and_matches_a_fresh_forward(calib):
    model = tiny("llama")
    an = anatomy_of(model)
    for bc in calibrate.blocks(an, calib, progress=False, dense_targets=True):
        xs = bc.dense_projection_inputs()
        assert set(xs) == {bc.twin(p.module) for p in bc.block.projections().values()}
        assert all(len(v) == calib.shape[0] for v in xs.values())
        cached = bc.run(dense=True)
        assert cached is bc.run(dense=True)  # not re-run
        bc._dense_out = None
        fresh = bc.run(dense=True)
        assert all(torch.equal(a, b) for a, b in zip(cached, fresh))
        with torch.no_grad():
            bc.block.attention.o.weight.zero_()  # pruning the block must not reach the dense copy
        assert all(torch.equal(a, b) for a, b in zip(bc.run(dense=True), fresh))


def test_unknown_projection_is_refused(calib):
    an = anatomy_of(tiny("llama"))
    bc = next(calibrate.blocks(an, calib, progress=False))
    other = an.blocks[1].attention.q
    with pytest.raises(ValueError, match="not a projection of block 0"):
        list(sequential.input_groups(bc, {"x": other}, sequential=True))


def _groups_of_second_block(calib, residual):
    """Every input group of block 1 (true sequential, dense stream), after block 0 was "pruned" (halved)."""
    an = anatomy_of(tiny("llama"))
    out = []
    for i, bc in enumerate(calibrate.blocks(an, calib, progress=False, dense_targets=True)):
        projs = {n: p for n, p in bc.block.projections().items()}
        if i == 0:
            for p in projs.values():
                p.weight.data.mul_(0.5)  # the pruned stream differs from the dense one from block 1 on
            continue
        for g in sequential.input_groups(bc, projs, sequential=True, residual=residual):
            W = torch.cat([projs[n].weight.detach().double() for n in g.names])
            out.append(([n.split(".")[-1] for n in g.names], W, *g.take()))
    return out


def test_residual_summed_directly_equals_w_times_c_minus_h(calib):
    by_c, by_r = _groups_of_second_block(calib, False), _groups_of_second_block(calib, True)
    assert [g[0] for g in by_c] == [g[0] for g in by_r] == [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]
    for (_, W, H, C, R0), (_, _, H1, C1, R) in zip(by_c, by_r):
        assert R0 is None and C1 is None and torch.equal(H, H1)
        ref = W @ (C.double() - H.double())  # (out, in)
        assert ref.abs().max() > 1e-3  # the two streams do differ here
        assert torch.allclose(R.double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_residual_by_default_where_it_is_the_smaller_statistic(calib):
    # tiny llama: q/k/v 64+32+32 outs and gate/up 2x128 outs read 64 inputs (C smaller); o 64 <= 64, down 64 < 128
    got = {tuple(names): (C is not None, R is not None) for names, _, _, C, R in _groups_of_second_block(calib, None)}
    assert got == {("q", "k", "v"): (True, False), ("o",): (False, True), ("gate", "up"): (True, False),
                   ("down",): (False, True)}


def test_dense_weights_are_dropped_once_their_stream_is_cached(calib):
    an = anatomy_of(tiny("llama"))
    bc = next(calibrate.blocks(an, calib, progress=False, dense_targets=True))
    with pytest.raises(ValueError, match="call dense_projection_inputs"):
        bc.drop_dense_weights()
    projs = dict(bc.block.projections())
    next(sequential.input_groups(bc, projs, sequential=True))
    assert all(p.is_meta for p in bc.dense.parameters())
    outs = bc.run(dense=True)  # the cached stream is still there
    assert len(outs) == calib.shape[0] and not outs[0].is_meta
    bc._dense_out = None
    with pytest.raises(RuntimeError, match="dropped"):
        bc.run(dense=True)
