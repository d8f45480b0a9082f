"""ViT (transformers 5 layout: `layers`, attention q/k/v/o_proj, mlp.fc1/fc2); pre-norm."""

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
)


@adapter("vit", ["vit"])
def vit_anatomy(model: nn.Module) -> Anatomy:
    cfg = model.config
    base = find_base(model, ["vit"])
    blocks_path = join(base, "layers")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    blocks = []
    for i, layer in enumerate(model.get_submodule(blocks_path)):
        p = f"{blocks_path}.{i}"
        attn = None if removed(layer.attention) else Attention(
            module=layer.attention,
            q=proj(model, f"{p}.attention.q_proj"),
            k=proj(model, f"{p}.attention.k_proj"),
            v=proj(model, f"{p}.attention.v_proj"),
            o=proj(model, f"{p}.attention.o_proj"),
            num_heads=heads_of(model, f"{p}.attention.q_proj", head_dim, heads),
            num_kv_heads=heads_of(model, f"{p}.attention.q_proj", head_dim, heads),
            head_dim=head_dim,
        )
        mlp = None if removed(layer.mlp) else MLP(module=layer.mlp, up=proj(model, f"{p}.mlp.fc1"), down=proj(model, f"{p}.mlp.fc2"), activation=cfg.hidden_act)
        norms = {"attn": layer.layernorm_before, "mlp": layer.layernorm_after}
        blocks.append(Block(i, layer, attn, mlp, norms, pre_norm=True))
    return Anatomy(
        model=model,
        family="vit",
        embed=model.get_submodule(join(base, "embeddings.patch_embeddings.projection")),
        blocks=blocks,
        blocks_path=blocks_path,
        final_norm=submodule_or_none(model, join(base, "layernorm")),
        head=submodule_or_none(model, "classifier") if base else None,
        tied=False,
        causal=False,
        hidden_size=cfg.hidden_size,
        vocab_size=None,
    )
