"""One view of every model: the Anatomy that all methods work on.

Adapters (one per architecture family, in this package) map Hugging Face modules
onto these terms; methods never import `transformers` model classes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Proj:
    """A linear projection. `weight` is always (out, in), also for GPT-2's Conv1D (stored (in, out))."""

    module: nn.Module
    name: str
    transposed: bool = False

    @property
    def weight(self) -> torch.Tensor:  # (out, in) view: in-place edits reach the module
        W = self.module.weight
        return W.t() if self.transposed else W

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def inputs_of(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten a captured input to (tokens, in)."""
        return x.reshape(-1, x.shape[-1])


@dataclass
class Attention:
    module: nn.Module
    o: Proj
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q: Proj | None = None
    k: Proj | None = None
    v: Proj | None = None
    qkv: Proj | None = None  # fused (GPT-2): output rows are [q | k | v]
    qk_norm: bool = False  # Qwen3-style per-head RMSNorm on q and k
    window: int | None = None  # sliding-window attention: a query sees its last `window` tokens (Gemma3 local layers)

    @property
    def projections(self) -> dict[str, Proj]:
        names = {"qkv": self.qkv} if self.qkv is not None else {"q": self.q, "k": self.k, "v": self.v}
        return {**{k: p for k, p in names.items() if p is not None}, "o": self.o}


@dataclass
class MLP:
    module: nn.Module
    up: Proj
    down: Proj
    activation: str
    gate: Proj | None = None

    @property
    def intermediate_size(self) -> int:
        return self.up.out_features

    @property
    def projections(self) -> dict[str, Proj]:
        out = {"gate": self.gate} if self.gate is not None else {}
        return {**out, "up": self.up, "down": self.down}


@dataclass
class PostNorm:
    """An RMSNorm on a sublayer's output before it joins the residual (Gemma's sandwich norms):
    y -> (offset + weight) * y / rms(y). Removing the sublayer stays exact (0 maps to 0); a re-fit that aims at
    the residual stream maps its target back through this norm (`pull_back`)."""

    module: nn.Module
    offset: float = 0.0  # Gemma stores gain - 1

    def pull_back(self, y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """A change `delta` of the norm's output, as a change of its input `y` (first order, y's scale kept)."""
        eps = getattr(self.module, "eps", getattr(self.module, "variance_epsilon", 1e-6))
        y = y.float()
        rms = (y.pow(2).mean(-1, keepdim=True) + eps).sqrt()  # (..., 1)
        g = self.offset + self.module.weight.float()  # (d,)
        g = torch.where(g.abs() < 1e-3, torch.full_like(g, 1e-3).copysign(g), g)
        return delta.float() * rms / g


@dataclass
class Block:
    index: int
    module: nn.Module
    attention: Attention | None
    mlp: MLP | None
    norms: dict[str, nn.Module] = field(default_factory=dict)
    pre_norm: bool = True
    scales: dict[str, nn.Module] = field(default_factory=dict)  # layer scale after "attn" / "mlp" (DINOv2, CaiT)
    post_norms: dict[str, PostNorm] = field(default_factory=dict)  # 'attn' / 'mlp': norm on the sublayer's output
    kind: str | None = None  # blocks of another kind get other forward arguments (Gemma3: sliding vs global)

    def projections(self) -> dict[str, Proj]:
        """Prunable projections by short name: 'attn.q', 'mlp.down', ..."""
        out: dict[str, Proj] = {}
        if self.attention is not None:
            out.update({f"attn.{k}": p for k, p in self.attention.projections.items()})
        if self.mlp is not None:
            out.update({f"mlp.{k}": p for k, p in self.mlp.projections.items()})
        return out


@dataclass
class Anatomy:
    """The model seen through common terms. `blocks_path` is the dotted name of the block list."""

    model: nn.Module
    family: str
    embed: nn.Module
    blocks: list[Block]
    blocks_path: str
    final_norm: nn.Module | None
    head: nn.Module | None
    tied: bool
    causal: bool
    hidden_size: int
    vocab_size: int | None

    @property
    def config(self):
        return self.model.config

    @property
    def block_list(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path)

    def projections(self) -> Iterator[tuple[str, Proj]]:
        """Every prunable projection with its full module name ('model.layers.3.mlp.down_proj')."""
        for block in self.blocks:
            for _, proj in block.projections().items():
                yield proj.name, proj

    def summary(self) -> dict:
        """Counts for `trimformer info`: per-part parameters, heads, FFN widths."""
        def n(m: nn.Module | None) -> int:
            return sum(p.numel() for p in m.parameters()) if m is not None else 0

        blocks = []
        for b in self.blocks:
            a, m = b.attention, b.mlp
            blocks.append(
                {
                    "index": b.index,
                    "heads": a.num_heads if a else 0,
                    "kv_heads": a.num_kv_heads if a else 0,
                    "head_dim": a.head_dim if a else 0,
                    "ffn": m.intermediate_size if m else 0,
                    "attention_params": _proj_params(a.projections) if a else 0,
                    "mlp_params": _proj_params(m.projections) if m else 0,
                    "params": n(b.module),
                }
            )
        head_params = 0 if (self.head is None or self.tied) else n(self.head)
        return {
            "family": self.family,
            "model_type": getattr(self.config, "model_type", None),
            "causal": self.causal,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "num_blocks": len(self.blocks),
            "pre_norm": self.blocks[0].pre_norm if self.blocks else None,
            "tied_embeddings": self.tied,
            "params_total": count_parameters(self.model),
            "params_embed": n(self.embed),
            "params_head": head_params,
            "params_blocks": sum(b["params"] for b in blocks),
            "blocks": blocks,
        }


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _proj_params(projs: dict[str, Proj]) -> int:
    total = 0
    for p in projs.values():
        total += p.weight.numel() + (p.bias.numel() if p.bias is not None else 0)
    return total
