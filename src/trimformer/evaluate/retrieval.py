"""Retrieval quality without labels beyond "same source" (BENCHMARK.md P4-vision), and neighbour stability (P4).

Pure functions on feature matrices: every item queries all the others by cosine similarity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def image_features(model: nn.Module, pixel_values: torch.Tensor, batch: int = 32) -> dict[str, torch.Tensor]:
    """{"cls": (n, H), "mean": (n, H)}: the [CLS] token and the mean of the patch tokens of the last hidden
    state (after the final norm), for pixel_values (n, 3, h, w) run `batch` at a time."""
    device = next(model.parameters()).device
    cls, mean = [], []
    for i in range(0, len(pixel_values), batch):
        h = model(pixel_values=pixel_values[i:i + batch].to(device)).last_hidden_state.float()  # (b, 1+N, H)
        cls.append(h[:, 0].cpu())
        mean.append(h[:, 1:].mean(1).cpu())
    return {"cls": torch.cat(cls), "mean": torch.cat(mean)}


def _similarity(features: torch.Tensor) -> torch.Tensor:
    """(n, n) cosine similarities with the diagonal (self-matches) at -inf."""
    f = F.normalize(features.float(), dim=-1)
    return (f @ f.T).fill_diagonal_(float("-inf"))


def retrieval_metrics(features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Recall@1 (the nearest other item shares the query's label) and mAP (average precision of the
    ranking of all other items, the relevant ones being those with the query's label), over all queries."""
    n = len(labels)
    if features.shape[0] != n:
        raise ValueError(f"{features.shape[0]} feature rows for {n} labels")
    sim = _similarity(features)
    order = sim.argsort(dim=1, descending=True, stable=True)[:, :-1]  # (n, n-1): self, at -inf, is last
    rel = (labels[order] == labels[:, None]).float()  # (n, n-1) 1 where the ranked item is a match
    hits = rel.sum(1)
    if bool((hits == 0).any()):
        raise ValueError("every label needs at least two items (a query with no match has no precision)")
    precision = rel.cumsum(1) / torch.arange(1, n, dtype=torch.float32)  # (n, n-1) precision at each rank
    ap = (precision * rel).sum(1) / hits
    return {"recall@1": rel[:, 0].mean().item(), "mAP": ap.mean().item()}


def feature_cosine(features: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Cosine between each item's feature and its reference (dense) feature: mean and 5th percentile."""
    cos = F.cosine_similarity(features.float(), reference.float(), dim=-1)
    return {"cos_mean": cos.mean().item(), "cos_p5": cos.quantile(0.05).item()}


def neighbour_in_topk(reference: torch.Tensor, features: torch.Tensor, k: int = 3) -> float:
    """Share of items whose nearest other item under `reference` (the dense embeddings) is among their
    k nearest under `features` (the pruned ones). k=1 is "nearest neighbour unchanged", which a set with
    near-ties makes fragile (bf16 alone moves 2 % of P4's neighbours); k=3 tolerates a swap among ties."""
    if reference.shape != features.shape:
        raise ValueError(f"reference {tuple(reference.shape)} and features {tuple(features.shape)} differ in shape")
    if not 1 <= k < len(reference):
        raise ValueError(f"k={k} must be in 1..{len(reference) - 1} (the other items)")
    nn_dense = _similarity(reference).argmax(1)  # (n,)
    topk = _similarity(features).topk(k, dim=1).indices  # (n, k)
    return (topk == nn_dense[:, None]).any(1).float().mean().item()
