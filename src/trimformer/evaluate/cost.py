"""Cost of a model: parameters, non-zeros, analytic FLOPs per token, bytes.

FLOPs count multiply-adds as 2. `flops_per_token` is what a dense kernel executes;
`flops_per_token_nonzero` counts only non-zero weights (what an ideal sparse kernel could reach);
the two differ only for unstructured / N:M sparsity, which makes a model no faster by itself.
"""

from __future__ import annotations

from torch import nn

from ..models import Anatomy, anatomy_of, count_parameters


def _unique_params(model: nn.Module):
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def nonzeros(model: nn.Module) -> int:
    return sum(int(p.count_nonzero()) for p in _unique_params(model))


def model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in _unique_params(model)) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def flops_per_token(anatomy: Anatomy, context: int, nonzero: bool = False) -> float:
    """Forward FLOPs per token at `context` tokens (causal: averaged over positions 1..context)."""
    def w(p) -> int:
        W = p.weight
        return int(W.count_nonzero()) if nonzero else W.numel()

    attended = (context + 1) / 2 if anatomy.causal else context
    total = 0.0
    for b in anatomy.blocks:
        for p in b.projections().values():
            total += 2 * w(p)
        a = b.attention
        if a is not None:
            total += 2 * 2 * a.num_heads * a.head_dim * attended  # q.k^T and attn @ v
    if anatomy.head is not None and anatomy.causal:
        total += 2 * anatomy.head.weight.numel()
    return total


def prunable_sparsity(anatomy: Anatomy) -> float:
    total = nz = 0
    for _, p in anatomy.projections():
        total += p.weight.numel()
        nz += int(p.weight.count_nonzero())
    return 1.0 - nz / max(total, 1)


def cost(model: nn.Module, context: int = 512) -> dict:
    a = anatomy_of(model)
    return {
        "params": count_parameters(model),
        "nonzeros": nonzeros(model),
        "sparsity_prunable": prunable_sparsity(a),
        "flops_per_token": flops_per_token(a, context),
        "flops_per_token_nonzero": flops_per_token(a, context, nonzero=True),
        "flops_context": context,
        "model_bytes": model_bytes(model),
    }
