"""Gemma 3 text decoders (Gemma3ForCausalLM, model_type gemma3_text): the LLaMA-like layout plus its quirks.

A norm before *and after* each sublayer (the output one is a `PostNorm`; RMSNorm gains stored as weight - 1),
embeddings scaled by sqrt(hidden) inside the embedding module, QK-norm, head_dim independent of hidden / heads
(256 in the 270M model, one KV head), and interleaved sliding-window and global layers with their own RoPE base
and mask (`Block.kind`, `Attention.window`).
"""

from __future__ import annotations

from torch import nn

from . import Anatomy, PostNorm, adapter
from .llama import llama_anatomy


@adapter("gemma3", ["gemma3_text"])
def gemma3_anatomy(model: nn.Module) -> Anatomy:
    a = llama_anatomy(model)
    a.family = "gemma3"
    kinds = list(getattr(model.config, "layer_types", None) or [])
    for b in a.blocks:
        layer = b.module
        b.norms = {"attn": layer.input_layernorm, "attn_out": layer.post_attention_layernorm,
                   "mlp": layer.pre_feedforward_layernorm, "mlp_out": layer.post_feedforward_layernorm}
        b.post_norms = {"attn": PostNorm(layer.post_attention_layernorm, 1.0),
                        "mlp": PostNorm(layer.post_feedforward_layernorm, 1.0)}
        b.kind = getattr(layer.self_attn, "layer_type", None) or (kinds[b.index] if b.index < len(kinds) else None)
        if b.attention is not None:
            b.attention.window = getattr(layer.self_attn, "sliding_window", None)
    return a
