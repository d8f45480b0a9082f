"""What a serving engine sees of a structurally pruned decoder, and what no engine format can hold.

DeciLM (`deci.py`) and GGUF (`gguf.py`) both describe a LLaMA-like decoder by a few global numbers (hidden size,
head size, norm eps, rope) and, per block, three counts: query heads, KV heads, FFN width, 0 meaning the sublayer
was removed. `engine_layout` reads those from the tensors (never from the config, which a cut may have left
stale) and refuses, with the reason and the way out, what neither format can express.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models import Anatomy, anatomy_of

# LLaMA-like model types these formats hold: pre-RMSNorm, rotary positions, gated SiLU MLP, no QK-norm.
FAMILIES = ("llama", "mistral", "qwen2")
ZERO_LIMIT = 0.25  # a projection with this share of exact zeros was weight-pruned, not structurally cut


class ExportError(ValueError):
    """The model holds something the requested format cannot express; the message says what to do instead."""


@dataclass(frozen=True)
class LayerShape:
    heads: int  # query heads; 0 = attention removed
    kv_heads: int  # 0 = attention removed
    ffn: int  # FFN width; 0 = MLP removed

    @property
    def empty(self) -> bool:
        return self.heads == 0 and self.ffn == 0


@dataclass
class EngineLayout:
    anatomy: Anatomy
    model_type: str
    hidden: int
    head_dim: int
    vocab: int
    eps: float
    activation: str
    rope: dict[str, Any]  # transformers' rope_parameters (rope_type, rope_theta, ...)
    max_positions: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    layers: list[LayerShape]

    @property
    def uniform(self) -> bool:
        """Every block keeps both sublayers with the same shapes: the family's own architecture holds it."""
        first = self.layers[0]
        return first.heads > 0 and first.ffn > 0 and all(s == first for s in self.layers)


def _bias(p) -> bool:
    return p is not None and p.bias is not None


def _zero_share(W: torch.Tensor) -> float:
    return float((W == 0).sum()) / W.numel()


def check_dense(anatomy: Anatomy) -> None:
    """Refuse weight-pruned (unstructured or N:M) projections: engines run them as dense matrices."""
    for name, p in anatomy.projections():
        share = _zero_share(p.weight)
        if share >= ZERO_LIMIT:
            raise ExportError(
                f"{name} has {share:.0%} zero weights (unstructured or N:M sparsity): llama.cpp, vLLM and SGLang "
                "run such weights as dense matrices, so the zeros give no speed there. Export them with "
                "`--format compressed-tensors` (vLLM reads its sparse layouts), or prune with a structured method "
                "(width, depth, search) to get a smaller dense model; pass --allow-zeros to write them dense anyway."
            )


def _eps(anatomy: Anatomy) -> float:
    norms = [n for b in anatomy.blocks for n in b.norms.values()] + [anatomy.final_norm]
    values = {float(getattr(n, "variance_epsilon", getattr(n, "eps", 0.0))) for n in norms}
    if len(values) != 1:
        raise ExportError(f"the RMSNorm eps differs between norms ({sorted(values)}); these formats hold one eps")
    return values.pop()


def engine_layout(model: nn.Module, *, allow_zeros: bool = False) -> EngineLayout:
    """The engine's view of `model`, or an ExportError naming what the formats cannot hold."""
    an = anatomy_of(model)
    cfg = model.config
    mt = getattr(cfg, "model_type", None)
    if mt not in FAMILIES:
        why = " (its q/k norms have no field in DeciLM or llama.cpp's deci architecture)" if mt == "qwen3" else ""
        raise ExportError(
            f"model_type {mt!r} cannot be written as DeciLM or GGUF by trimformer{why}: these exports hold "
            f"LLaMA-like decoders ({', '.join(FAMILIES)}). Save it with --format hf (our modeling file reloads it)."
        )
    window = getattr(cfg, "sliding_window", None)
    if window and (mt == "mistral" or getattr(cfg, "use_sliding_window", False)) and window < cfg.max_position_embeddings:
        raise ExportError(f"sliding-window attention ({window} tokens) has no field in DeciLM or the GGUF deci "
                          "architecture; save it with --format hf")
    if not allow_zeros:
        check_dense(an)
    if cfg.hidden_act not in ("silu", "swish"):
        raise ExportError(f"activation {cfg.hidden_act!r}: llama.cpp's llama/deci graphs and DeciLM's MLP are SiLU-gated")
    attns = [b.attention for b in an.blocks if b.attention is not None]
    mlps = [b.mlp for b in an.blocks if b.mlp is not None]
    if not attns:
        raise ExportError("every attention sublayer was removed; no engine format holds a model without attention")
    qkv = {_bias(a.q) for a in attns} | {_bias(a.k) for a in attns} | {_bias(a.v) for a in attns}
    o = {_bias(a.o) for a in attns}
    mlp_b = {_bias(m.up) for m in mlps}
    if len(qkv) > 1 or len(o) > 1 or len(mlp_b) > 1:
        raise ExportError("biases differ between blocks; DeciLM and GGUF describe biases for the whole model")
    rope = dict(getattr(cfg, "rope_parameters", None) or {"rope_type": "default",
                                                         "rope_theta": getattr(cfg, "rope_theta", 10000.0)})
    layers = [LayerShape(b.attention.num_heads if b.attention else 0, b.attention.num_kv_heads if b.attention else 0,
                         b.mlp.intermediate_size if b.mlp else 0) for b in an.blocks]
    return EngineLayout(
        anatomy=an, model_type=mt, hidden=an.embed.weight.shape[1], head_dim=attns[0].head_dim,
        vocab=an.embed.weight.shape[0], eps=_eps(an), activation=cfg.hidden_act, rope=rope,
        max_positions=int(cfg.max_position_embeddings), tied=an.tied, qkv_bias=qkv.pop(), o_bias=o.pop(),
        mlp_bias=bool(mlp_b and mlp_b.pop()), layers=layers,
    )
