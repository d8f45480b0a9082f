"""DINOv2 (transformers 5 layout: `encoder.layer`, attention q/k/v/o_proj, mlp.fc1/fc2); pre-norm with layer scale.

Each residual branch ends in a per-channel layer scale (`layer_scale1` after attention, `layer_scale2`
after the MLP): block output = x + lambda1 * o_proj(attn) and then + lambda2 * fc2(mlp). The Anatomy
names those scales in `Block.scales`; `fold_layer_scale_` moves them into o_proj / fc2 (exact), so
methods that re-fit an output projection against the block's output see a plain pre-norm block.
Position embeddings are stored for `config.image_size` and interpolated (bicubic) to other sizes by
the model itself, so token methods see the physical sequence of the input's patches + [CLS].
"""

from __future__ import annotations

import torch
from torch import nn

from . import MLP, Anatomy, Attention, Block, adapter, find_base, heads_of, join, proj, removed


@adapter("dinov2", ["dinov2"])
def dinov2_anatomy(model: nn.Module) -> Anatomy:
    cfg = model.config
    base = find_base(model, ["dinov2"])
    blocks_path = join(base, "encoder.layer")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    blocks = []
    for i, layer in enumerate(model.get_submodule(blocks_path)):
        p = f"{blocks_path}.{i}"
        if getattr(cfg, "use_swiglu_ffn", False):
            raise NotImplementedError("DINOv2 with a SwiGLU FFN (the giant model) has no trimformer adapter yet")
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
        mlp = None if removed(layer.mlp) else MLP(
            module=layer.mlp, up=proj(model, f"{p}.mlp.fc1"), down=proj(model, f"{p}.mlp.fc2"), activation=cfg.hidden_act,
        )
        norms = {"attn": layer.norm1, "mlp": layer.norm2}
        scales = {"attn": layer.layer_scale1, "mlp": layer.layer_scale2}
        blocks.append(Block(i, layer, attn, mlp, norms, pre_norm=True, scales=scales))
    return Anatomy(
        model=model,
        family="dinov2",
        embed=model.get_submodule(join(base, "embeddings.patch_embeddings.projection")),
        blocks=blocks,
        blocks_path=blocks_path,
        final_norm=model.get_submodule(join(base, "layernorm")),
        head=model.get_submodule("classifier") if base else None,
        tied=False,
        causal=False,
        hidden_size=cfg.hidden_size,
        vocab_size=None,
    )


@torch.no_grad()
def fold_layer_scale_(anatomy: Anatomy) -> Anatomy:
    """Multiply each layer scale into the projection before it and set the scale to 1 (outputs unchanged
    up to rounding). Returns the anatomy; a model without layer scales is left as it is."""
    for b in anatomy.blocks:
        for part, out in (("attn", b.attention.o if b.attention else None), ("mlp", b.mlp.down if b.mlp else None)):
            scale = b.scales.get(part)
            if scale is None or out is None:
                continue
            lam = scale.lambda1  # (H,)
            out.weight.mul_(lam[:, None])  # (H, in): row j scaled by lambda_j
            if out.bias is not None:
                out.bias.mul_(lam)
            lam.fill_(1.0)
    return anatomy
