"""kvpress side of benchmarks/p3_kv.py, run by kvpress's own venv (transformers 5.2):
    /work/peers/kvpress/bin/python benchmarks/p3_kv_peer.py INPUT.pt OUTPUT.json
INPUT (written by p3_kv.py) holds the model directory, the token ids and the press list; this script
uses kvpress as an installed package only. Scoring on a compressed DynamicCache passes explicit
position_ids continuing from the original context length (BENCHMARK.md)."""

from __future__ import annotations

import json
import math
import sys
import time

import kvpress
import torch
import torch.nn.functional as F
import transformers
from peak_memory import peak_bytes  # benchmarks/ is on sys.path when run as a script
from transformers import AutoModelForCausalLM, DynamicCache

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

PRESSES = {  # name -> (factory(ratio), note)
    "streaming": (lambda r: kvpress.StreamingLLMPress(compression_ratio=r), ""),
    "snapkv": (lambda r: kvpress.SnapKVPress(compression_ratio=r), ""),
    "tova": (lambda r: kvpress.TOVAPress(compression_ratio=r), ""),
    "knorm": (lambda r: kvpress.KnormPress(compression_ratio=r), ""),
    "expected-attention": (lambda r: kvpress.ExpectedAttentionPress(compression_ratio=r), ""),
    "observed-attention": (lambda r: kvpress.ObservedAttentionPress(compression_ratio=r), "eager attention"),
    "random": (lambda r: kvpress.RandomPress(compression_ratio=r, seed=0), ""),
    "think": (lambda r: kvpress.ThinKPress(key_channel_compression_ratio=r), "channels"),
    "adakv-snapkv": (lambda r: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=r)), "per-head"),
}


def kv_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def prefill(model, press, ids: torch.Tensor) -> tuple[DynamicCache, torch.Tensor, float]:
    cache = DynamicCache()
    t = time.perf_counter()
    if press is None:
        out = model(ids[None], past_key_values=cache, use_cache=True)
    else:
        with press(model):
            out = model(ids[None], past_key_values=cache, use_cache=True)
    return cache, out.logits[0, -1], time.perf_counter() - t


@torch.no_grad()
def continue_(model, cache, ids: torch.Tensor, start: int) -> torch.Tensor:
    pos = torch.arange(start, start + ids.numel())[None]
    return model(ids[None], past_key_values=cache, position_ids=pos, use_cache=True).logits[0]


@torch.no_grad()
def greedy(model, cache, first: torch.Tensor, start: int, n: int) -> list[int]:
    out, tok, pos = [], first.argmax().item(), start
    for _ in range(n):
        out.append(tok)
        logits = continue_(model, cache, torch.tensor([tok]), pos)
        tok, pos = logits[-1].argmax().item(), pos + 1
    return out




@torch.no_grad()
def memory_split(model_for, ctx: torch.Tensor, presses: list[str], ratio: float, steps: int = 4) -> dict:
    """As p3_kv.memory_split: peak bytes above the model's own in prefill and in `steps` decode steps."""
    out = {}
    T = ctx.numel()
    for name in presses:
        m = model_for(name)
        make, _ = PRESSES[name]
        (cache, _, _), pre = peak_bytes(lambda: prefill(m, make(ratio), ctx))  # noqa: B023
        held = kv_bytes(cache)
        _, dec = peak_bytes(lambda: [continue_(m, cache, ctx[i:i + 1], T + i) for i in range(steps)])  # noqa: B023
        out[name] = {"prefill_peak": pre, "decode_peak": held + dec, "cache_after_prefill": held}
    return out


def main(inp: str, outp: str) -> None:
    spec = torch.load(inp)
    torch.set_num_threads(spec["threads"])
    models = {}

    def model_for(name):
        impl = "eager" if name == "observed-attention" else "sdpa"
        if impl not in models:
            models[impl] = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                                attn_implementation=impl).eval()
        return models[impl]

    base = model_for("full")
    rows = {}
    for c, (ctx, cont) in enumerate(zip(spec["contexts"], spec["continuations"])):
        T = ctx.numel()
        cache, last, t_full = prefill(base, None, ctx)
        full_bytes = kv_bytes(cache)
        ref = F.log_softmax(torch.cat([last[None], continue_(base, cache, cont[:-1], T)]).float(), -1)
        for name in spec["presses"]:
            make, note = PRESSES[name]
            for r in spec["ratios"]:
                m = model_for(name)
                cache, last, t_pre = prefill(m, make(r), ctx)
                kept = kv_bytes(cache)
                t = time.perf_counter()
                logp = F.log_softmax(torch.cat([last[None], continue_(m, cache, cont[:-1], T)]).float(), -1)
                t_cont = time.perf_counter() - t
                row = rows.setdefault(f"{name}@{r}", {"press": name, "ratio": r, "note": note, "nll": 0.0, "n": 0,
                                                     "kl": 0.0, "agree": 0, "bytes": [], "prefill_ratio": [],
                                                     "needle_agnostic": [], "needle_aware": []})
                row["nll"] += F.nll_loss(logp, cont, reduction="sum").item()
                # trimformer.evaluate.quality.compare's formula (this venv does not import trimformer)
                row["kl"] += F.kl_div(logp, ref, log_target=True, reduction="sum").item()
                row["agree"] += (logp.argmax(-1) == ref.argmax(-1)).sum().item()
                row["n"] += cont.numel()
                row["bytes"].append(kept / full_bytes)
                row["prefill_ratio"].append(t_pre / t_full)
                row["continuation_s"] = row.get("continuation_s", 0.0) + t_cont
        print(f"peer context {c + 1}/{len(spec['contexts'])} done", file=sys.stderr, flush=True)
    for hay, question in spec["needles"]:
        if time.time() > spec["deadline"]:
            print("peer: time budget spent, needle cases left out", file=sys.stderr, flush=True)
            break
        for name in spec["presses"]:
            make, _ = PRESSES[name]
            for r in spec["needle_ratios"]:
                m, row = model_for(name), rows[f"{name}@{r}"]
                # query-agnostic: compress the haystack alone, then ask
                cache, _, _ = prefill(m, make(r), hay)
                logits = continue_(m, cache, question, hay.numel())
                row["needle_agnostic"].append(greedy(m, cache, logits[-1], hay.numel() + question.numel(),
                                                     spec["answer_tokens"]))
                # query-aware: the question is part of the compressed prompt
                both = torch.cat([hay, question])
                cache, last, _ = prefill(m, make(r), both)
                row["needle_aware"].append(greedy(m, cache, last, both.numel(), spec["answer_tokens"]))
    memory = {}
    if spec.get("memory_ratio") is not None:
        memory = memory_split(model_for, spec["contexts"][0], spec["presses"], spec["memory_ratio"])
    for row in rows.values():
        row["ppl"] = math.exp(row["nll"] / row["n"])
        row["kl"] /= row["n"]
        row["top1_agree"] = row.pop("agree") / row["n"]
        row["bytes_kept"] = sum(row["bytes"]) / len(row["bytes"])
        row["prefill_time_ratio"] = sorted(row["prefill_ratio"])[len(row["prefill_ratio"]) // 2]
        del row["bytes"], row["prefill_ratio"]
    with open(outp, "w") as f:
        json.dump({"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
                   "rows": list(rows.values()), "memory": memory}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
