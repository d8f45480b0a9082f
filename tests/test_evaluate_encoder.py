"""P4 measurement for an encoder (evaluate/encoder.py) on the tiny random BERT: a no-op scores as dense."""

from __future__ import annotations

import pytest
import torch

from trimformer import tokens
from trimformer.evaluate.encoder import embed, evaluate_encoder, neighbours


@pytest.fixture
def batches():
    g = torch.Generator().manual_seed(4)
    out = []
    for _ in range(2):
        ids = torch.randint(3, 128, (4, 20), generator=g)  # (B, T)
        mask = torch.ones_like(ids)
        mask[1, 15:] = 0  # a padded row
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_rows_score_against_the_dense_model_and_report_unreachable_settings(bert, batches):
    methods = [("merge", {"keep": 1.0}), ("merge", {"keep": 0.3, "features": "hidden"}), ("merge", {"flops": 0.01})]
    rows = evaluate_encoder(bert, batches, methods, timing_batches=1, reps=1, progress=False, prune=tokens.prune)
    same, merged, unreachable = rows
    assert same["cos_mean"] == pytest.approx(1.0, abs=1e-5) and same["nn_unchanged"] == 1.0
    assert same["flops_ratio"] == pytest.approx(1.0) and same["settings"] == {"recover": 4, "keep": 1.0}
    assert merged["flops_ratio"] < 0.8 and merged["cos_mean"] < 0.999 and merged["keep"] == 0.3
    assert merged["latency_ratio"] > 0 and merged["cos_p5"] <= merged["cos_mean"]
    assert "error" in unreachable and "flops" in unreachable["error"]
    e = embed(bert, batches)  # (8, H)
    assert e.shape == (8, bert.config.hidden_size)
    assert neighbours(torch.stack([e[0], e[0] * 2, -e[0]])).tolist() == [1, 0, 0]  # by cosine, never itself
