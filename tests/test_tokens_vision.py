"""Every token method on tiny random ViT and DINOv2 models: physically shorter sequences, [CLS] kept,
full length restored, batch = each image alone, interpolated positions, FLOPs targets, clean exit."""

from __future__ import annotations

import math

import pytest
import torch

from trimformer import tokens

METHODS = ["zero-tprune", "merge", "transform", "acc", "coverage", "eet"]
L = 4  # blocks in the fixtures


@pytest.fixture(params=["vit", "dinov2"])
def model(request):
    return request.getfixturevalue(request.param)


def pixels(n: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def last_hidden(model, px):
    base = getattr(model, "vit", model)  # ViTForImageClassification wraps the backbone
    with torch.no_grad():
        return base(pixel_values=px).last_hidden_state


@pytest.mark.parametrize("name", METHODS)
def test_keep_one_changes_nothing(model, name):
    px = pixels(2)
    ref = last_hidden(model, px)
    settings = {"mass": 1.0} if name == "coverage" else {"keep": 1.0}
    with tokens.prune(model, name, **settings) as s:
        assert torch.equal(last_hidden(model, px), ref)
    assert s.counts == [[65, 65]] * L


@pytest.mark.parametrize("name", METHODS)
def test_sequence_is_physically_shorter_and_cls_kept(model, name):
    px = pixels(3, seed=1)
    shapes: list[int] = []
    blocks = model.vit.layers if hasattr(model, "vit") else model.encoder.layer
    extra = {"mass": 0.7} if name == "coverage" else {}
    with tokens.prune(model, name, keep=0.3, **extra) as s:
        spy = [b.register_forward_pre_hook(lambda m, a: shapes.append(a[0].shape[1])) for b in blocks]
        try:
            out = last_hidden(model, px)
        finally:
            for h in spy:
                h.remove()
        assert (s.state.index[:, 0] == 0).all()  # [CLS] stays, first
        assert s.flops()["ratio"] < 0.9
    assert shapes[0] == 65 and shapes[-1] < 65 and shapes == sorted(shapes, reverse=True)
    assert out.shape[1] == shapes[-1]  # without recovery the output is the short sequence


@pytest.mark.parametrize("name", METHODS)
def test_recover_full_length_and_batch_equals_each_image(model, name):
    px = pixels(2, seed=2)
    extra = {"mass": 0.7} if name == "coverage" else {}
    with tokens.prune(model, name, keep=0.3, recover=L, **extra):
        out = last_hidden(model, px)
        assert out.shape == (2, 65, 64)
        for b in range(2):
            torch.testing.assert_close(out[b], last_hidden(model, px[b:b + 1])[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["merge", "zero-tprune"])
def test_interpolated_positions(dinov2, name):
    """DINOv2 stores positions for 32 px and interpolates: a 48 x 40 image has 12 x 10 patches + [CLS]."""
    px = pixels(2, 48, 40, seed=3)
    ref = last_hidden(dinov2, px)
    assert ref.shape[1] == 121
    with tokens.prune(dinov2, name, keep=1.0):
        assert torch.equal(last_hidden(dinov2, px), ref)
    with tokens.prune(dinov2, name, keep=0.25, recover=L) as s:
        out = last_hidden(dinov2, px)
    assert out.shape == ref.shape and s.counts[-1] == [math.ceil(121 * 0.25 - 1e-6)] * 2
    assert torch.nn.functional.cosine_similarity(out[:, 0], ref[:, 0]).min() > 0.5  # still the same images


def test_flops_target_is_an_upper_bound_for_merge(dinov2):
    """keep is solved with block cost linear in tokens; attention falls quadratically, so merging (no
    attention scores to pay for) lands at or below the target. On DINOv2-S at 257 tokens attention is ~11 %
    of a block and the gap is ~1 point; on this 64-wide model it is larger."""
    with tokens.prune(dinov2, "merge", flops=0.6, recover=L) as s:
        last_hidden(dinov2, pixels(2, 64, 64, seed=4))  # 257 tokens, as a 224-px image at patch 14
    assert 0.45 < s.flops()["ratio"] <= 0.6


def test_acc_speedup_on_dinov2(dinov2, monkeypatch):
    from trimformer.models import anatomy_of
    from trimformer.tokens import acc

    t = acc.measure_block(anatomy_of(dinov2), 16, 1)  # real timings of a DINOv2 block (layer scale, no mask)
    assert len(t) == len(acc.GRID) and all(x > 0 for x in t)
    monkeypatch.setattr(acc, "measure_block", lambda anatomy, tokens, batch: list(acc.GRID))  # noise-free
    monkeypatch.setattr(acc, "measure_decision", lambda anatomy, tokens, batch: [0.0] * len(acc.GRID))
    m = tokens.build("acc", {"speedup": 1.3, "recover": L})
    with tokens.prune(dinov2, m) as s:
        last_hidden(dinov2, pixels(1, seed=5))
    assert sum(m.solved) == pytest.approx(L / 1.3, rel=1e-3) and s.counts[-1][0] < 65


def test_model_left_as_found(dinov2):
    px = pixels(2, seed=6)
    ref = last_hidden(dinov2, px)
    before = {k for m in dinov2.modules() for d in (m._forward_pre_hooks, m._forward_hooks) for k in d}
    with pytest.raises(RuntimeError, match="boom"), tokens.prune(dinov2, "transform", keep=0.3):
        last_hidden(dinov2, px)
        raise RuntimeError("boom")
    after = {k for m in dinov2.modules() for d in (m._forward_pre_hooks, m._forward_hooks) for k in d}
    assert after == before and torch.equal(last_hidden(dinov2, px), ref)
    outs = []
    for _ in range(2):
        with tokens.prune(dinov2, "zero-tprune", keep=0.3, recover=L):
            outs.append(last_hidden(dinov2, px))
    assert torch.equal(outs[0], outs[1])


def test_eet_prunes_at_its_stage_boundaries_only(dinov2):
    with tokens.prune(dinov2, "eet", keep=0.25, stages=[1, 3]) as s:
        last_hidden(dinov2, pixels(2))
    assert s.counts == [[65, 65], [33, 33], [33, 33], [17, 17]]  # 65 * 0.25 ** (1/2), then 65 * 0.25
    m = tokens.build("eet", {"flops": 0.6})
    m.check(12)
    assert m.boundaries(12) == [3, 6, 9]
    assert sum(m.fraction(i, 12) for i in range(12)) / 12 == pytest.approx(0.6, abs=1e-6)
    with pytest.raises(ValueError, match="stages"):
        tokens.build("eet", {"stages": [3, 2]})


def test_eet_scores_feature_response_and_cls_attention():
    from trimformer.tokens.base import Context

    B, T, h, D = 1, 9, 2, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, h * D, generator=g)
    x[0, [2, 5]] *= 50  # two strongly responding patches
    k = torch.randn(B, h, T, D, generator=g)
    q = torch.zeros(B, h, T, D)
    q[0, :, 0] = 10 * k[0, :, 7]  # [CLS] attends to patch 7
    ctx = Context(block=1, x=x, q=q, k=k, valid=torch.ones(B, T, dtype=torch.bool),
                  protected=torch.zeros(B, T, dtype=torch.bool), sizes=torch.ones(B, T), target=torch.tensor([3]),
                  causal=False)
    ctx.flops = 0.0  # (the engine adds it to every context)
    by_response = tokens.build("eet", {"response": 100.0}).score(ctx)
    assert set(by_response[0].topk(2).indices.tolist()) == {2, 5}
    by_attention = tokens.build("eet", {"response": 0.0}).score(ctx)
    assert by_attention[0, 1:].argmax().item() + 1 == 7
