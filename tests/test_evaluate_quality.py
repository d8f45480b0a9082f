"""Quality measures against naive references: one definition of KL / top-1 / perplexity for reports and benchmarks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny

from trimformer.evaluate import Reference, compare, kl_top1, log_probs, perplexity


def naive(model, dense, windows):
    kl = agree = nll = 0.0
    for w in windows:
        p = F.softmax(dense(input_ids=w[None]).logits[0].double(), -1)  # (T, V)
        q = F.softmax(model(input_ids=w[None]).logits[0].double(), -1)
        kl += (p * (p.log() - q.log())).sum().item()
        agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
        nll -= q[:-1].log().gather(1, w[1:, None]).sum().item()
    n = windows.numel()
    return {"kl": kl / n, "top1_agree": agree / n, "ppl": math.exp(nll / (n - len(windows)))}


@torch.no_grad()
def test_reference_and_kl_top1_match_the_definitions(calib):
    dense, model = tiny("llama"), tiny("llama", seed=1)
    want = naive(model, dense, calib)
    got = Reference(dense, calib).score(model)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-4)
    direct = kl_top1(model, dense, calib, progress=False)
    assert direct["kl"] == pytest.approx(got["kl"], rel=1e-6) and direct["top1_agree"] == got["top1_agree"]
    assert perplexity(model, calib, progress=False) == pytest.approx(want["ppl"], rel=1e-4)
    same = Reference(dense, calib, dtype=torch.float16).score(dense)
    assert same["top1_agree"] == 1.0 and abs(same["kl"]) < 1e-3  # only the fp16 rounding of the kept log-probs


@torch.no_grad()
def test_log_probs_of_a_window_and_of_a_batch(calib):
    """log_probs is log_softmax of the float32 logits; a batch gives each window's rows, and compare() on them
    is KL(dense || model) summed over positions, the sum Reference.score averages."""
    dense, model = tiny("llama"), tiny("llama", seed=1)
    one = log_probs(model, calib[0])  # (T, V)
    assert one.shape == (calib.shape[1], model.config.vocab_size) and one.dtype == torch.float32
    assert torch.equal(one, F.log_softmax(model(input_ids=calib[:1]).logits[0].float(), -1))
    assert torch.allclose(one.exp().sum(-1), torch.ones(one.shape[0]), atol=1e-5)
    both = log_probs(model, calib[:2])  # (2, T, V)
    assert both.shape == (2, *one.shape) and torch.allclose(both[0], one, atol=1e-6)
    kl, agree = compare(one, log_probs(dense, calib[0]))
    want = naive(model, dense, calib[:1])
    assert kl / calib.shape[1] == pytest.approx(want["kl"], rel=1e-4) and agree / calib.shape[1] == want["top1_agree"]
