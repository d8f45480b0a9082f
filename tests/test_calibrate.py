"""The block-by-block runner reproduces the model, and feeds each block the pruned outputs before it."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny

from trimformer import calibrate
from trimformer.models import anatomy_of


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2", "opt", "bert"])
def test_runner_reproduces_the_models_hidden_states(family, calib):
    """Also across block kinds: gemma3's block 1 is global (own mask and RoPE base), block 0 a sliding window of 8."""
    model = tiny(family)
    a = anatomy_of(model)
    with torch.no_grad():
        out = model(input_ids=calib[:2], output_hidden_states=True)
    ref = out.hidden_states  # (blocks+1) x (B, T, H); the last one after the final norm where there is one
    outs = []
    for bc in calibrate.blocks(a, calib[:2], batch_size=2, progress=False):
        torch.testing.assert_close(bc.inputs[0], ref[bc.block.index], rtol=1e-5, atol=1e-5)
        outs.append(bc.run()[0])
    assert len(outs) == 2
    with torch.no_grad():
        last = a.final_norm(outs[-1]) if a.final_norm is not None else outs[-1]
    torch.testing.assert_close(last, ref[-1], rtol=1e-5, atol=1e-5)


def test_next_block_sees_the_pruned_block(calib):
    model = tiny("llama")
    a = anatomy_of(model)
    seen = {}
    for bc in calibrate.blocks(a, calib, progress=False):
        seen[bc.block.index] = [x.clone() for x in bc.inputs]
        if bc.block.index == 0:
            with torch.no_grad():
                bc.block.mlp.down.weight.zero_()  # "prune" block 0
    with torch.no_grad():  # the model, now pruned, gives block 1 exactly what the runner gave it
        hs = torch.cat([model(input_ids=calib[i : i + 1], output_hidden_states=True).hidden_states[1] for i in range(4)])
    torch.testing.assert_close(torch.cat(seen[1]), hs, rtol=1e-5, atol=1e-5)


def test_collect_statistics_match_a_direct_computation(calib):
    model = tiny("llama")
    a = anatomy_of(model)
    bc = next(calibrate.blocks(a, calib, progress=False))
    block = bc.block
    stats = bc.collect({"up": block.mlp.up}, hessian=True)["up"]
    captured = []
    h = block.mlp.up.module.register_forward_hook(lambda m, i, o: captured.append(i[0].reshape(-1, i[0].shape[-1])))
    bc.run()
    h.remove()
    X = torch.cat(captured)  # (tokens, in)
    assert stats.n == X.shape[0] == 4 * 32
    torch.testing.assert_close(stats.sq, (X * X).sum(0))
    torch.testing.assert_close(stats.H, X.t() @ X, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.norm, X.norm(dim=0))
