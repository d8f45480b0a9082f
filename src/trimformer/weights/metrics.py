"""Sparsity-aware metrics: per-layer and model sparsity, and the PQ Index (Diao et al. 2023, arXiv:2302.05601).

PQ Index of w in R^d, 0 < p < q:  I(w) = 1 - d^(1/q - 1/p) * ||w||_p / ||w||_q, in [0, 1 - d^(1/q - 1/p)]:
0 for a vector of equal magnitudes, highest when one entry holds all the mass. Higher = more compressible.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import anatomy_of


def pq_index(w: torch.Tensor, p: float = 0.5, q: float = 1.0) -> float:
    if not 0 < p < q:
        raise ValueError(f"PQ Index needs 0 < p < q, got p={p}, q={q}")
    a = w.detach().abs().flatten().double()
    d = a.numel()
    norm_q = a.pow(q).sum().pow(1 / q)
    if norm_q == 0:
        return 0.0
    norm_p = a.pow(p).sum().pow(1 / p)
    return float(1 - d ** (1 / q - 1 / p) * norm_p / norm_q)


@torch.no_grad()
def analyze(model: nn.Module, p: float = 0.5, q: float = 1.0) -> dict:
    """Per prunable projection: parameters, zeros, sparsity, PQ Index; and the same over all of them together."""
    layers = []
    sum_p, sum_q, d_all, zeros_all = 0.0, 0.0, 0, 0
    for name, proj in anatomy_of(model).projections():
        W = proj.weight.detach()
        a = W.abs().flatten().double()
        zeros = int((W == 0).sum())
        layers.append({"layer": name, "params": W.numel(), "zeros": zeros, "sparsity": zeros / W.numel(),
                       "pq_index": pq_index(W, p, q)})
        sum_p += float(a.pow(p).sum())
        sum_q += float(a.pow(q).sum())
        d_all += W.numel()
        zeros_all += zeros
    model_pq = 1 - d_all ** (1 / q - 1 / p) * sum_p ** (1 / p) / sum_q ** (1 / q) if sum_q else 0.0
    return {"p": p, "q": q, "layers": layers,
            "model": {"params": d_all, "zeros": zeros_all, "sparsity": zeros_all / max(d_all, 1), "pq_index": model_pq}}
