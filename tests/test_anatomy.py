"""Every adapter maps its family onto the same Anatomy terms."""

from __future__ import annotations

import pytest
import torch
from conftest import ALL_FAMILIES, tiny

from trimformer.models import UnsupportedModelError, anatomy_of, count_parameters

EXPECTED = {  # family: (adapter family, heads, kv heads, ffn, tied, causal)
    "llama": ("llama-like", 4, 2, 128, True, True),
    "qwen3": ("llama-like", 4, 2, 128, False, True),
    "mistral": ("llama-like", 4, 1, 128, False, True),
    "qwen2": ("llama-like", 4, 2, 128, False, True),
    "gemma3": ("gemma3", 4, 1, 128, True, True),
    "gpt2": ("gpt2", 4, 4, 256, True, True),
    "opt": ("opt", 4, 4, 128, True, True),
    "bert": ("bert-like", 4, 4, 128, False, False),
    "roberta": ("bert-like", 4, 4, 128, False, False),
    "vit": ("vit", 4, 4, 128, False, False),
    "dinov2": ("dinov2", 4, 4, 128, False, False),
}


@pytest.mark.parametrize("family", [*ALL_FAMILIES, "dinov2"])
def test_anatomy_counts(family):
    model = tiny(family)
    a = anatomy_of(model)
    fam, heads, kv, ffn, is_tied, causal = EXPECTED[family]
    assert (a.family, a.tied, a.causal, len(a.blocks)) == (fam, is_tied, causal, 2)
    for b in a.blocks:
        assert (b.attention.num_heads, b.attention.num_kv_heads, b.mlp.intermediate_size) == (heads, kv, ffn)
        hd = b.attention.head_dim
        projs = b.attention.projections
        if "qkv" in projs:  # fused: rows are [q | k | v]
            assert projs["qkv"].weight.shape == ((heads + 2 * kv) * hd, a.hidden_size)
        else:
            assert projs["q"].weight.shape == (heads * hd, a.hidden_size)
            assert projs["k"].weight.shape == (kv * hd, a.hidden_size)
        assert projs["o"].weight.shape == (a.hidden_size, heads * hd)
        assert b.mlp.down.weight.shape == (a.hidden_size, ffn)
    assert a.summary()["params_total"] == count_parameters(model)
    assert set(a.blocks[0].scales) == ({"attn", "mlp"} if family == "dinov2" else set())


def test_qk_norm_flag():
    assert anatomy_of(tiny("qwen3")).blocks[0].attention.qk_norm
    assert not anatomy_of(tiny("llama")).blocks[0].attention.qk_norm


def test_proj_weight_is_a_live_out_in_view_for_conv1d():
    model = tiny("gpt2")
    p = anatomy_of(model).blocks[0].mlp.up  # Conv1D stores (in, out)
    assert p.transposed and p.weight.shape == (256, 64)
    with torch.no_grad():
        p.weight[3, 5] = 7.0
    assert model.transformer.h[0].mlp.c_fc.weight[5, 3].item() == 7.0


def test_unsupported_architecture_names_the_supported_families():
    import transformers as T

    model = T.T5Model(T.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, vocab_size=32, d_kv=8))
    with pytest.raises(UnsupportedModelError, match=r"t5.*bert-like.*gemma3.*gpt2.*llama-like.*opt.*vit"):
        anatomy_of(model)
