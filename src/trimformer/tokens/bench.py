"""BENCHMARK.md P4 for token pruning in an encoder: embedding fidelity and cost, dense side by side.

Shared by `trimformer bench-tokens` and benchmarks/p4_tokens.py.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import doc_corpus
from ..evaluate.quality import mean_pooled
from ..evaluate.retrieval import neighbour_in_topk
from ..progress import bar
from . import build, prune


def paragraph_batches(tokenizer, n: int = 512, batch: int = 32, lo: int = 32, hi: int = 256) -> list[dict]:
    """The doc corpus split into paragraphs; the first n of lo..hi tokens (with specials), in corpus order."""
    chosen = []
    for p in doc_corpus().split("\n\n"):
        if p.strip() and lo <= len(tokenizer(p)["input_ids"]) <= hi:
            chosen.append(p)
            if len(chosen) == n:
                break
    if len(chosen) < n:
        raise ValueError(f"the doc corpus has only {len(chosen)} paragraphs of {lo}-{hi} tokens; ask for fewer")
    return [dict(tokenizer(chosen[i:i + batch], padding=True, return_tensors="pt")) for i in range(0, n, batch)]


@torch.no_grad()
def _embed(model: nn.Module, batches: list[dict]) -> torch.Tensor:
    return torch.cat([mean_pooled(model, b["input_ids"], b["attention_mask"]) for b in batches])  # (n, H)


def _neighbours(e: torch.Tensor) -> torch.Tensor:
    e = F.normalize(e, dim=-1)
    return (e @ e.T).fill_diagonal_(-2.0).argmax(1)  # (n,) nearest other paragraph


@torch.no_grad()
def _latency_ratio(model: nn.Module, batches: list[dict], method, reps: int) -> float:
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
    methods: list[tuple[str, dict[str, Any]]],
    timing_batches: int = 2,
    reps: int = 3,
    progress: bool = True,
    reference: torch.Tensor | None = None,
) -> list[dict]:
    """One row per (method, settings): cosine mean / p5, nearest neighbour unchanged and dense neighbour in
    the pruned top 3, FLOPs and latency ratios.
    `reference` (n, H): the dense embeddings to compare with (default: this model's own, unpruned); a
    model fine-tuned for pruning is compared with the original's."""
    num_blocks = len(model.get_submodule(_blocks_path(model)))
    dense = _embed(model, batches) if reference is None else reference
    nn_dense = _neighbours(dense)
    rows = []
    for name, settings in bar(methods, desc="token methods", unit="setting", disable=not progress):
        settings = {"recover": num_blocks, **settings}  # full length out, so mean pooling is unchanged
        method = build(name, settings)
        pruned, dense_flops, pruned_flops = [], 0.0, 0.0
        try:
            with prune(model, method) as session:
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
        lat = _latency_ratio(model, batches[:timing_batches], method, reps)
        rows.append({
            "method": name,
            "settings": {k: v for k, v in settings.items()},
            "solved_schedule": getattr(method, "solved", None),
            "keep": method.keep,
            "cos_mean": cos.mean().item(),
            "cos_p5": cos.quantile(0.05).item(),
            "nn_unchanged": (_neighbours(e) == nn_dense).float().mean().item(),
            "nn_top3": neighbour_in_topk(dense, e, 3),
            "flops_ratio": pruned_flops / dense_flops,
            "latency_ratio": lat,
        })
    return rows


def _blocks_path(model: nn.Module) -> str:
    from ..models import anatomy_of

    return anatomy_of(model).blocks_path
