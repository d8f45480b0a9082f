"""What each removable unit costs in parameters, and the weights multiplied per token (FLOPs/token = 2x)."""

from __future__ import annotations

from ..models import MLP, Anatomy, Attention, Block


def neuron_params(m: MLP) -> float:
    """Parameters one FFN neuron holds: a row of up (and gate) with its bias, a column of down."""
    rows = [p for p in (m.up, m.gate) if p is not None]
    return float(sum(p.in_features + (p.bias is not None) for p in rows) + m.down.out_features)


def head_unit(a: Attention) -> int:
    """Heads removed together: one per KV group under GQA (groups stay even), else a single head."""
    return a.num_kv_heads if a.num_heads != a.num_kv_heads else 1


def head_slots(a: Attention | None) -> int:
    """Head units an attention holds (`head_unit` query heads each); 0 without attention."""
    return a.num_heads // head_unit(a) if a is not None else 0


def block_widths(anatomy: Anatomy) -> tuple[list[int], list[int]]:
    """Per block: FFN neurons and head units (0 where the sublayer is absent), what width cuts."""
    return ([b.mlp.intermediate_size if b.mlp else 0 for b in anatomy.blocks],
            [head_slots(b.attention) for b in anatomy.blocks])


def head_slot_params(a: Attention) -> float:
    """Parameters of one head unit (`head_unit` query heads): q rows and o columns, and k, v rows without GQA."""
    d = a.o.out_features
    per_q = 2 * d * a.head_dim  # q rows + o columns
    kv = 2 * d * a.head_dim if a.num_heads == a.num_kv_heads else 0  # MHA: k, v go with q
    return float((per_q + kv) * head_unit(a))


def sublayer_params(block: Block, kind: str) -> int:
    """Weights of a block's attention ('attn') or MLP ('mlp') projections; 0 when it is gone."""
    part = block.attention if kind == "attn" else block.mlp
    return sum(p.weight.numel() for p in part.projections.values()) if part is not None else 0


def matmul_params(anatomy: Anatomy) -> float:
    """Weights multiplied per token: every block projection and the output head (FLOPs/token = 2x this)."""
    total = sum(p.weight.numel() for _, p in anatomy.projections())
    return float(total + (anatomy.head.weight.numel() if anatomy.head is not None else 0))
