"""DeciLM / Nemotron-NAS checkpoints (`block_configs`): a heterogeneous cut that stock vLLM serves.

Read from the engines' own loaders (vLLM 0.32 `model_executor/models/nemotron_nas.py` and
`transformers_utils/model_arch_config_convertor.py`, SGLang `srt/models/nemotron_nas.py` and `configs/model_config.py`,
llama.cpp's converter `conversion/deci.py` as vendored by llama-cpp-python 0.3.36), field by field:

global
  num_attention_heads   query heads, global in every reader: each attention block is built with this many, so a cut
                        with per-block query-head counts is refused here (llama.cpp's GGUF deci holds it: gguf.py).
  head_dim              vLLM's LlamaAttention reads it (else hidden // heads): written so that a head cut whose
                        heads x head_dim != hidden loads right. The converter ignores it (key length = hidden // heads).
  num_key_value_heads   unused for nemotron-nas (vLLM takes the first attention block's count from block_configs);
                        written as that same count for readers that expect the key.
  attention_bias,       vLLM: attention_bias puts a bias on o_proj and, unless qkv_bias is given, on q/k/v; qkv_bias
  qkv_bias, mlp_bias    sets q/k/v alone. Both written, so every bias layout (Qwen2: q/k/v only) is expressible.
  rope_parameters       vLLM's get_rope reads config.rope_parameters; rope_theta / rope_scaling are written too for
                        SGLang and transformers 4 readers.
block_configs[i].attention
  n_heads_in_group      query heads per KV head: KV heads = num_attention_heads // n_heads_in_group (vLLM, SGLang,
                        converter). SGLang refuses models whose blocks differ here ("variable GQA"); vLLM builds each.
                        null for a removed attention (the converter reads null + replace_with_linear false as 0 heads).
  no_op                 vLLM and SGLang build no attention and no input_layernorm: that norm's tensor is left out,
                        since their weight loaders have no parameter for it.
  replace_with_linear   always false (no cut here replaces attention by a linear map); the converter indexes it.
block_configs[i].ffn
  ffn_mult              vLLM uses it whenever the attribute exists, as find_multiple(int(2 * m * hidden / 3), 256);
                        SGLang, TensorRT-LLM and the converter read only it. Written only when that rounding gives the
                        exact width (a multiple of 256), else null: then SGLang and the converter fail loudly at load
                        (never a wrong shape), and for llama.cpp the GGUF export holds any width.
  intermediate_size     the exact width the cut produced; vLLM reads it when ffn_mult is absent.
  no_op                 as for attention (post_attention_layernorm left out); the converter keys on ffn_mult null.
  replace_with_linear   always false.

The config class shipped with the checkpoint (`configuration_decilm.py`, as NVIDIA's checkpoints ship one; no
modeling code) turns each block dict into an object whose null fields are *absent*, which is what lets vLLM's
`hasattr(ffn, "ffn_mult")` fall through to `intermediate_size`. Before anything is written, the shapes every reader
builds from the config (`built_shapes`, vLLM's rules) are compared with the tensors; `load_deci` reads a checkpoint
back by those rules, so a test can compare logits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import atomic_dir, write_files
from .layout import EngineLayout, ExportError, LayerShape, engine_layout

CONFIG_FILE = "configuration_decilm.py"
WEIGHTS_FILE = "model.safetensors"


def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def ffn_width(ffn_mult: float, hidden: int) -> int:
    """The FFN width vLLM, SGLang and llama.cpp's converter build from `ffn_mult`."""
    return _find_multiple(int(2 * ffn_mult * hidden / 3), 256)


def ffn_mult_for(width: int, hidden: int) -> float | None:
    """An `ffn_mult` from which every reader builds exactly `width`, or None when none exists."""
    m = 3 * width / (2 * hidden)
    for cand in (m, round(m, 6)):
        if ffn_width(cand, hidden) == width:
            return cand
    return None


def block_configs(layout: EngineLayout) -> list[dict[str, Any]]:
    H = max(s.heads for s in layout.layers)
    out = []
    for i, s in enumerate(layout.layers):
        if s.heads and s.heads != H:
            raise ExportError(
                f"block {i} keeps {s.heads} query heads, others {H}: DeciLM's num_attention_heads is global in vLLM, "
                "SGLang and TensorRT-LLM, so per-block query heads cannot be written. Use --format gguf (llama.cpp "
                "reads per-layer head counts), or cut KV groups / whole heads uniformly."
            )
        if s.heads and H % s.kv_heads:
            raise ExportError(f"block {i}: {H} query heads over {s.kv_heads} KV heads is not a whole group size")
        attention = {"n_heads_in_group": H // s.kv_heads if s.heads else None, "no_op": not s.heads,
                     "replace_with_linear": False}
        ffn = {"ffn_mult": ffn_mult_for(s.ffn, layout.hidden) if s.ffn else None,
               "intermediate_size": s.ffn or None, "no_op": not s.ffn, "replace_with_linear": False}
        out.append({"attention": attention, "ffn": ffn})
    return out


def deci_config(model: nn.Module, layout: EngineLayout) -> dict[str, Any]:
    """config.json of the DeciLM checkpoint (every block key explicit)."""
    cfg = model.config
    blocks = block_configs(layout)
    H = max(s.heads for s in layout.layers)
    first_kv = next(s.kv_heads for s in layout.layers if s.heads)
    rope = dict(layout.rope)
    out = {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": "nemotron-nas",
        "auto_map": {"AutoConfig": f"{CONFIG_FILE[:-3]}.DeciLMConfig"},
        "hidden_size": layout.hidden,
        "num_hidden_layers": len(layout.layers),
        "num_attention_heads": H,
        "num_key_value_heads": first_kv,
        "head_dim": layout.head_dim,
        "intermediate_size": max(s.ffn for s in layout.layers),
        "hidden_act": layout.activation,
        "rms_norm_eps": layout.eps,
        "max_position_embeddings": layout.max_positions,
        "vocab_size": layout.vocab,
        "tie_word_embeddings": layout.tied,
        "attention_bias": layout.o_bias,
        "qkv_bias": layout.qkv_bias,
        "mlp_bias": layout.mlp_bias,
        "rope_parameters": rope,
        "rope_theta": rope.get("rope_theta", 10000.0),
        "bos_token_id": getattr(cfg, "bos_token_id", None),
        "eos_token_id": getattr(cfg, "eos_token_id", None),
        "pad_token_id": getattr(cfg, "pad_token_id", None),
        "dtype": str(layout.anatomy.embed.weight.dtype).removeprefix("torch."),
        "block_configs": blocks,
    }
    if rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    out["torch_dtype"] = out["dtype"]
    return out


def built_shapes(config: dict[str, Any]) -> list[LayerShape]:
    """Per block, what vLLM builds from a DeciLM config.json (ffn_mult wins over intermediate_size when given)."""
    H, hidden = config["num_attention_heads"], config["hidden_size"]
    out = []
    for b in config["block_configs"]:
        a, f = b["attention"], b["ffn"]
        heads, kv = (0, 0) if a["no_op"] else (H, H // a["n_heads_in_group"])
        if f["no_op"]:
            ffn = 0
        else:
            ffn = ffn_width(f["ffn_mult"], hidden) if f.get("ffn_mult") is not None else f["intermediate_size"]
        out.append(LayerShape(heads, kv, ffn))
    return out


def state_dict(layout: EngineLayout) -> dict[str, torch.Tensor]:
    """Tensors under the names vLLM's DeciLM loader expects; none for removed sublayers or their norms."""
    an = layout.anatomy
    out = {"model.embed_tokens.weight": an.embed.weight, "model.norm.weight": an.final_norm.weight}
    if not layout.tied:
        out["lm_head.weight"] = an.head.weight
    for b in an.blocks:
        for part, norm, norm_name, prefix in ((b.attention, "attn", "input_layernorm", "self_attn"),
                                              (b.mlp, "mlp", "post_attention_layernorm", "mlp")):
            if part is None:
                continue
            p = f"model.layers.{b.index}"
            out[f"{p}.{norm_name}.weight"] = b.norms[norm].weight
            for short, proj in part.projections.items():
                out[f"{p}.{prefix}.{short}_proj.weight"] = proj.weight
                if proj.bias is not None:
                    out[f"{p}.{prefix}.{short}_proj.bias"] = proj.bias
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def save_deci(model: nn.Module, out: str | os.PathLike, *, tokenizer: Any = None, overwrite: bool = False,
              extra_files: dict[str, Any] | None = None, allow_zeros: bool = False) -> Path:
    """Write `model` as a DeciLM checkpoint (config.json, configuration_decilm.py, safetensors, tokenizer)."""
    layout = engine_layout(model, allow_zeros=allow_zeros)
    config = deci_config(model, layout)
    if built_shapes(config) != layout.layers:  # never a checkpoint that loads with other shapes
        raise ExportError("internal: the DeciLM config would build other shapes than the tensors hold")
    tensors = state_dict(layout)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / CONFIG_FILE).write_text(CONFIG_TEMPLATE)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.to_json_file(tmp / "generation_config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_files(tmp, extra_files)
    return Path(out)


@torch.no_grad()
def load_deci(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Read a DeciLM checkpoint by vLLM's rules into a transformers LLaMA with per-layer shapes (no remote code)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from ..structure.surgery import RemovedAttention, RemovedMLP

    path = Path(path)
    c = json.loads((path / "config.json").read_text())
    shapes = built_shapes(c)
    H, D, hidden = c["num_attention_heads"], c["head_dim"], c["hidden_size"]
    base = LlamaConfig(hidden_size=hidden, num_hidden_layers=c["num_hidden_layers"], num_attention_heads=1,
                       num_key_value_heads=1, head_dim=D, intermediate_size=max(c["intermediate_size"], 1),
                       hidden_act=c["hidden_act"], rms_norm_eps=c["rms_norm_eps"], vocab_size=c["vocab_size"],
                       max_position_embeddings=c["max_position_embeddings"], rope_parameters=c["rope_parameters"],
                       tie_word_embeddings=c["tie_word_embeddings"], attention_bias=c["qkv_bias"],
                       mlp_bias=c["mlp_bias"])
    base.num_attention_heads = H  # after validation: heads x head_dim need not equal hidden
    model = LlamaForCausalLM(base).to(dtype)
    for i, s in enumerate(shapes):
        if s.heads:
            base.num_key_value_heads, base.intermediate_size = s.kv_heads, max(s.ffn, 1)
            layer = LlamaDecoderLayer(base, i).to(dtype)
            if c["attention_bias"] != c["qkv_bias"]:
                o = layer.self_attn.o_proj
                layer.self_attn.o_proj = nn.Linear(o.in_features, o.out_features, bias=c["attention_bias"], dtype=dtype)
        else:
            base.intermediate_size = max(s.ffn, 1)
            layer = LlamaDecoderLayer(base, i).to(dtype)
            layer.self_attn = RemovedAttention(i)
        if not s.ffn:
            layer.mlp = RemovedMLP()
        model.model.layers[i] = layer
    state = load_file(str(path / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    unused = {f"model.layers.{i}.{norm}.weight" for i, s in enumerate(shapes)
              for norm, gone in (("input_layernorm", not s.heads), ("post_attention_layernorm", not s.ffn)) if gone}
    unused |= {"lm_head.weight"} if c["tie_word_embeddings"] else set()  # norms of removed sublayers never run
    missing = [k for k in missing if k not in unused]
    if missing or unexpected:
        raise ExportError(f"{path}: tensors do not match the DeciLM config: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}")
    if c["tie_word_embeddings"]:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


CONFIG_TEMPLATE = '''"""DeciLM (Nemotron-NAS) configuration: a LLaMA whose blocks differ (block_configs). Written by trimformer.

Configuration only, no modeling code: vLLM's DeciLMForCausalLM builds the model. Each block dict is read as an
object; a null field is absent (hasattr is False), so vLLM builds `ffn.intermediate_size` when `ffn_mult` is null.
"""

from transformers import LlamaConfig


class _Fields(dict):
    """A dict read by attribute; null fields read as absent."""

    def __getattr__(self, key):
        value = self.get(key)
        if value is None:
            raise AttributeError(key)
        return _Fields(value) if isinstance(value, dict) else value


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = [_Fields(b) for b in block_configs or []]
        super().__init__(**kwargs)

    def validate_architecture(self):
        """heads x head_dim need not equal hidden_size: head_dim is explicit."""
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size is not a multiple of num_attention_heads and head_dim is not given")
'''
