"""BENCHMARK.md P4 for inference-time pruning of an encoder: embedding fidelity and cost, dense side by side.

Shared by `trimformer bench-tokens` and benchmarks/p4_*.py. The method under test comes in as `prune`,
a context manager factory (`trimformer.tokens.prune`): measurement does not depend on the methods.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import doc_paragraphs
from ..models import anatomy_of
from ..progress import bar
from .quality import mean_pooled
from .retrieval import neighbour_in_topk

# prune(model, name, **settings) or prune(model, method) -> a session with `.method` and `.flops()`
Prune = Callable[..., AbstractContextManager[Any]]


def paragraph_batches(tokenizer, n: int = 512, batch: int = 32, lo: int = 32, hi: int = 256) -> list[dict]:
    """The doc corpus split into paragraphs; the first n of lo..hi tokens (with specials), in corpus order."""
    chosen = doc_paragraphs(tokenizer, n, lo, hi)
    if len(chosen) < n:
        raise ValueError(f"the doc corpus has only {len(chosen)} paragraphs of {lo}-{hi} tokens; ask for fewer")
    return [dict(tokenizer(chosen[i:i + batch], padding=True, return_tensors="pt")) for i in range(0, n, batch)]


@torch.no_grad()
def embed(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    """Mean-pooled embeddings of every paragraph: (n, H)."""
    return torch.cat([mean_pooled(model, b["input_ids"], b["attention_mask"]) for b in batches])  # (n, H)


def neighbours(e: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest other row by cosine: (n,)."""
    e = F.normalize(e, dim=-1)
    return (e @ e.T).fill_diagonal_(-2.0).argmax(1)  # (n,)


@torch.no_grad()
def _latency_ratio(model: nn.Module, batches: list[dict], prune: Prune, method: Any, reps: int) -> float:
    """Median over alternating dense / pruned runs of one batch each: the load here changes fast."""
    ratios = []
    for _ in range(reps):
        for b in batches:
            t0 = time.perf_counter()
            model(**b)
            dense = time.perf_counter() - t0
            with prune(model, method):
                t0 = time.perf_counter()
                model(**b)
                ratios.append((time.perf_counter() - t0) / dense)
    return statistics.median(ratios)


def evaluate_encoder(
    model: nn.Module,
    batches: list[dict],
    methods: Sequence[tuple[str, dict[str, Any]]],
    timing_batches: int = 2,
    reps: int = 3,
    progress: bool = True,
    reference: torch.Tensor | None = None,
    *,
    prune: Prune,
) -> list[dict]:
    """One row per (method, settings): cosine mean / p5, nearest neighbour unchanged and dense neighbour in the
    pruned top 3, FLOPs and latency ratios.
    `prune`: `trimformer.tokens.prune`. `reference` (n, H): the dense embeddings to compare with (default:
    this model's own, unpruned); a model fine-tuned for pruning is compared with the original's. A setting
    the method cannot reach on this model (a ValueError when it attaches) is reported as its row's error."""
    num_blocks = len(anatomy_of(model).blocks)
    dense = embed(model, batches) if reference is None else reference
    nn_dense = neighbours(dense)
    rows = []
    for name, settings in bar(methods, desc="token methods", unit="setting", disable=not progress):
        settings = {"recover": num_blocks, **settings}  # full length out, so mean pooling is unchanged
        pruned, dense_flops, pruned_flops = [], 0.0, 0.0
        try:
            with prune(model, name, **settings) as session:
                method = session.method
                for b in batches:
                    pruned.append(mean_pooled(model, b["input_ids"], b["attention_mask"]))
                    f = session.flops()
                    dense_flops += f["dense"]
                    pruned_flops += f["pruned"]
        except ValueError as e:  # e.g. a speedup out of reach on this machine: report it, go on
            rows.append({"method": name, "settings": settings, "error": str(e)})
            continue
        e = torch.cat(pruned)
        cos = F.cosine_similarity(e, dense)
        lat = _latency_ratio(model, batches[:timing_batches], prune, method, reps)
        rows.append({
            "method": name,
            "settings": dict(settings),
            "solved_schedule": getattr(method, "solved", None),
            "keep": method.keep,
            "cos_mean": cos.mean().item(),
            "cos_p5": cos.quantile(0.05).item(),
            "nn_unchanged": (neighbours(e) == nn_dense).float().mean().item(),
            "nn_top3": neighbour_in_topk(dense, e, 3),
            "flops_ratio": pruned_flops / dense_flops,
            "latency_ratio": lat,
        })
    return rows
