"""Real speed (BENCHMARK.md P2): prefill of 1 x T tokens and greedy decode steps; medians after a warm-up.

With a reference, both models are timed alternately in the same process and threads, so machine
noise hits both alike; report ratios, not absolute times.
"""

from __future__ import annotations

import inspect
import resource
import statistics
import sys
import time

import torch
from torch import nn


@torch.no_grad()
def _prefill_s(model: nn.Module, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t0


@torch.no_grad()
def _decode_s(model: nn.Module, ids: torch.Tensor, steps: int) -> float:
    """Seconds for `steps` greedy decode steps after a prefill of `ids` (prefill not counted)."""
    # transformers 5 names the cache `cache` (argument and output) in the families it has moved; the others keep
    # `past_key_values`
    new_name = "cache" in inspect.signature(model.forward).parameters
    name = "cache" if new_name else "past_key_values"
    out = model(input_ids=ids, use_cache=True)
    cache, nxt = getattr(out, name), out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, use_cache=True, **{name: cache})
        cache, nxt = getattr(out, name), out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - t0


def fastest(fns: list, runs: int) -> list[float]:
    """The fastest of `runs` timings of each fn, taken in interleaved rounds (every fn once per round) after one
    warm-up each. Other work on the machine only ever adds time, so the minimum is the least disturbed estimate,
    and interleaving makes a slow phase hit every option alike (a per-option median on a busy machine ranked a
    smaller block slower than a bigger one)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(runs):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def speed(
    model: nn.Module,
    reference: nn.Module | None = None,
    *,
    prefill_tokens: int = 512,
    decode_steps: int = 32,
    runs: int = 5,
    causal: bool = True,
    vocab: int = 1000,
) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, prefill_tokens), generator=g)
    models = {"model": model} if reference is None else {"model": model, "reference": reference}
    times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in models}
    for m in models.values():  # warm-up
        _prefill_s(m, ids)
        if causal:
            _decode_s(m, ids[:, :64], 2)
    for _ in range(runs):
        for k, m in models.items():
            times[k]["prefill"].append(_prefill_s(m, ids))
            if causal:
                times[k]["decode"].append(_decode_s(m, ids, decode_steps))
    out: dict = {"prefill_tokens": prefill_tokens, "decode_steps": decode_steps if causal else 0, "runs": runs,
                 "threads": torch.get_num_threads()}
    for k in models:
        suffix = "" if k == "model" else "_reference"
        out[f"prefill_s{suffix}"] = statistics.median(times[k]["prefill"])
        if causal:
            out[f"decode_tokens_per_s{suffix}"] = decode_steps / statistics.median(times[k]["decode"])
    if reference is not None:
        out["prefill_ratio"] = out["prefill_s"] / out["prefill_s_reference"]
        if causal:
            out["decode_ratio"] = out["decode_tokens_per_s_reference"] / out["decode_tokens_per_s"]
    return out
