"""LLaMA-like decoders: Llama, Mistral, Qwen2, Qwen3 (QK-norm), SmolLM (LLaMA architecture)."""

from __future__ import annotations

from torch import nn

from . import (
    MLP,
    Anatomy,
    Attention,
    Block,
    adapter,
    find_base,
    heads_of,
    join,
    proj,
    removed,
    submodule_or_none,
    tied,
)


@adapter("llama-like", ["llama", "mistral", "qwen2", "qwen3", "smollm3"])
def llama_anatomy(model: nn.Module) -> Anatomy:
    cfg = model.config
    base = find_base(model, ["model"])
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    blocks_path = join(base, "layers")
    blocks = []
    for i, layer in enumerate(model.get_submodule(blocks_path)):
        p = f"{blocks_path}.{i}"
        attn = None if removed(layer.self_attn) else Attention(
            module=layer.self_attn,
            q=proj(model, f"{p}.self_attn.q_proj"),
            k=proj(model, f"{p}.self_attn.k_proj"),
            v=proj(model, f"{p}.self_attn.v_proj"),
            o=proj(model, f"{p}.self_attn.o_proj"),
            num_heads=heads_of(model, f"{p}.self_attn.q_proj", head_dim, heads),
            num_kv_heads=heads_of(model, f"{p}.self_attn.k_proj", head_dim, kv),
            head_dim=head_dim,
            qk_norm=hasattr(layer.self_attn, "q_norm"),
        )
        mlp = None if removed(layer.mlp) else MLP(
            module=layer.mlp,
            gate=proj(model, f"{p}.mlp.gate_proj"),
            up=proj(model, f"{p}.mlp.up_proj"),
            down=proj(model, f"{p}.mlp.down_proj"),
            activation=getattr(cfg, "hidden_act", None) or cfg.hidden_activation,  # Gemma names it so
        )
        norms = {"attn": layer.input_layernorm, "mlp": layer.post_attention_layernorm}
        blocks.append(Block(i, layer, attn, mlp, norms, pre_norm=True))
    embed = model.get_submodule(join(base, "embed_tokens"))
    head = submodule_or_none(model, "lm_head") if base else None
    return Anatomy(
        model=model,
        family="llama-like",
        embed=embed,
        blocks=blocks,
        blocks_path=blocks_path,
        final_norm=model.get_submodule(join(base, "norm")),
        head=head,
        tied=tied(model, embed, head),
        causal=True,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
    )
