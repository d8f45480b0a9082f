"""OPT: separate q/k/v with biases, fc1/fc2 MLP, pre- or post-norm (`do_layer_norm_before`)."""

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


@adapter("opt", ["opt"])
def opt_anatomy(model: nn.Module) -> Anatomy:
    cfg = model.config
    base = find_base(model, ["model.decoder", "decoder"])
    blocks_path = join(base, "layers")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    blocks = []
    for i, layer in enumerate(model.get_submodule(blocks_path)):
        p = f"{blocks_path}.{i}"
        attn = None if removed(layer.self_attn) else Attention(
            module=layer.self_attn,
            q=proj(model, f"{p}.self_attn.q_proj"),
            k=proj(model, f"{p}.self_attn.k_proj"),
            v=proj(model, f"{p}.self_attn.v_proj"),
            o=proj(model, f"{p}.self_attn.out_proj"),
            num_heads=heads_of(model, f"{p}.self_attn.q_proj", head_dim, heads),
            num_kv_heads=heads_of(model, f"{p}.self_attn.q_proj", head_dim, heads),
            head_dim=head_dim,
        )
        # OPT's MLP has no module of its own: fc1/fc2 sit on the layer.
        mlp = MLP(module=layer, up=proj(model, f"{p}.fc1"), down=proj(model, f"{p}.fc2"), activation=cfg.activation_function)
        norms = {"attn": layer.self_attn_layer_norm, "mlp": layer.final_layer_norm}
        blocks.append(Block(i, layer, attn, mlp, norms, pre_norm=bool(cfg.do_layer_norm_before)))
    embed = model.get_submodule(join(base, "embed_tokens"))
    head = submodule_or_none(model, "lm_head") if base.startswith("model") else None
    return Anatomy(
        model=model,
        family="opt",
        embed=embed,
        blocks=blocks,
        blocks_path=blocks_path,
        final_norm=submodule_or_none(model, join(base, "final_layer_norm")),
        head=head,
        tied=tied(model, embed, head),
        causal=True,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
    )
