"""BERT-like encoders: BERT, RoBERTa, MiniLM (BERT architecture), XLM-R; post-norm."""

from __future__ import annotations

from torch import nn

from . import MLP, Anatomy, Attention, Block, adapter, find_base, heads_of, join, proj, submodule_or_none


@adapter("bert-like", ["bert", "roberta", "xlm-roberta", "camembert"])
def bert_anatomy(model: nn.Module) -> Anatomy:
    cfg = model.config
    base = find_base(model, ["bert", "roberta"])
    blocks_path = join(base, "encoder.layer")
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    blocks = []
    for i, layer in enumerate(model.get_submodule(blocks_path)):
        p = f"{blocks_path}.{i}"
        attn = Attention(
            module=layer.attention,
            q=proj(model, f"{p}.attention.self.query"),
            k=proj(model, f"{p}.attention.self.key"),
            v=proj(model, f"{p}.attention.self.value"),
            o=proj(model, f"{p}.attention.output.dense"),
            num_heads=heads_of(model, f"{p}.attention.self.query", head_dim, heads),
            num_kv_heads=heads_of(model, f"{p}.attention.self.query", head_dim, heads),
            head_dim=head_dim,
        )
        mlp = MLP(
            module=layer,
            up=proj(model, f"{p}.intermediate.dense"),
            down=proj(model, f"{p}.output.dense"),
            activation=cfg.hidden_act,
        )
        norms = {"attn": layer.attention.output.LayerNorm, "mlp": layer.output.LayerNorm}
        blocks.append(Block(i, layer, attn, mlp, norms, pre_norm=False))
    # Masked-LM heads tie their decoder to the word embeddings.
    head = submodule_or_none(model, "cls.predictions.decoder") or submodule_or_none(model, "lm_head.decoder")
    embed = model.get_submodule(join(base, "embeddings.word_embeddings"))
    return Anatomy(
        model=model,
        family="bert-like",
        embed=embed,
        blocks=blocks,
        blocks_path=blocks_path,
        final_norm=None,
        head=head,
        tied=head is not None and head.weight is embed.weight,
        causal=False,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
    )
