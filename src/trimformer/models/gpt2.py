"""GPT-2: fused qkv in a Conv1D (weights stored (in, out)), learned positions, pre-norm."""

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


@adapter("gpt2", ["gpt2"])
def gpt2_anatomy(model: nn.Module) -> Anatomy:
    cfg = model.config
    base = find_base(model, ["transformer"])
    blocks_path = join(base, "h")
    heads = cfg.n_head
    head_dim = getattr(cfg, "head_dim", None) or cfg.n_embd // heads
    blocks = []
    for i, layer in enumerate(model.get_submodule(blocks_path)):
        p = f"{blocks_path}.{i}"
        attn = None if removed(layer.attn) else Attention(
            module=layer.attn,
            qkv=proj(model, f"{p}.attn.c_attn", transposed=True),
            o=proj(model, f"{p}.attn.c_proj", transposed=True),
            num_heads=heads_of(model, f"{p}.attn.c_proj", head_dim, heads, inputs=True),
            num_kv_heads=heads_of(model, f"{p}.attn.c_proj", head_dim, heads, inputs=True),
            head_dim=head_dim,
        )
        mlp = None if removed(layer.mlp) else MLP(
            module=layer.mlp,
            up=proj(model, f"{p}.mlp.c_fc", transposed=True),
            down=proj(model, f"{p}.mlp.c_proj", transposed=True),
            activation=cfg.activation_function,
        )
        blocks.append(Block(i, layer, attn, mlp, {"attn": layer.ln_1, "mlp": layer.ln_2}, pre_norm=True))
    embed = model.get_submodule(join(base, "wte"))
    head = submodule_or_none(model, "lm_head") if base else None
    return Anatomy(
        model=model,
        family="gpt2",
        embed=embed,
        blocks=blocks,
        blocks_path=blocks_path,
        final_norm=model.get_submodule(join(base, "ln_f")),
        head=head,
        tied=tied(model, embed, head),
        causal=True,
        hidden_size=cfg.n_embd,
        vocab_size=cfg.vocab_size,
    )
