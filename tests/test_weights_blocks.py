"""Block sparsity: whole RxC blocks removed (magnitude, Wanda, SparseGPT/OBS), exact masks, clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny

import trimformer
from trimformer.weights import WEIGHTS
from trimformer.weights.masks import block_mask
from trimformer.weights.obs import inverse_cholesky, obs_prune


def _is_block_sparse(W: torch.Tensor, bh: int, bw: int) -> bool:
    nz = (W != 0).reshape(W.shape[0] // bh, bh, W.shape[1] // bw, bw).sum((1, 3))  # non-zeros per block
    return bool(((nz == 0) | (nz == bh * bw)).all())


def test_block_mask_removes_the_lowest_blocks():
    s = torch.arange(16.0).reshape(4, 4)
    keep = block_mask(s, 0.5, 2, 2)
    expected = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(keep, expected)  # the two top-left/top-right blocks have the lowest sums


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("block", ["1x4", "4x1", "4x4"])
def test_models_get_exact_blocks(method, block, calib):
    model = tiny("llama")
    settings = {"sparsity": 0.5, "pattern": f"block:{block}"} | ({"blocksize": 32} if method == "sparsegpt" else {})
    trimformer.prune_(model, WEIGHTS.build(method, settings), calibration=calib, progress=False)
    bh, bw = (int(x) for x in block.split("x"))
    for _, p in trimformer.anatomy_of(model).projections():
        assert _is_block_sparse(p.weight, bh, bw)
        assert (p.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_obs_blocks_reconstruct_better_than_magnitude_blocks():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)
    W = torch.randn(32, 64, generator=g)
    obs = obs_prune(W, inverse_cholesky(X.T @ X, 0.01), sparsity=0.5, block=(1, 4), blocksize=16)
    mag = W * block_mask(W.abs(), 0.5, 1, 4)
    assert _is_block_sparse(obs, 1, 4)
    err = lambda V: (X @ (V - W).T).square().sum().item()  # noqa: E731
    assert err(obs) < 0.8 * err(mag)


def test_bad_block_patterns_are_named(calib):
    with pytest.raises(ValueError, match="block:RxC"):
        WEIGHTS.build("magnitude", {"pattern": "block:4"})
    model = tiny("llama")
    with pytest.raises(ValueError, match="does not tile"):
        trimformer.prune_(model, WEIGHTS.build("magnitude", {"pattern": "block:3x3"}), progress=False)
