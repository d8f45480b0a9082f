"""BENCHMARK.md P3: KV-cache compression on smollm2-135m, trimformer's presses and kvpress 0.5.5's side by
side in one run (kvpress in its own venv, as a subprocess on the same token ids).

    PYTHONPATH=src python benchmarks/p3_kv.py                     # full protocol: 8 contexts, 9 needles
    PYTHONPATH=src python benchmarks/p3_kv.py --contexts 2 --needles 3 --no-speed   # reduced

Writes benchmarks/results/p3_kv.json, .md and p3_kv.png (quality vs KV bytes physically kept).
`ratio` = share of the cache removed (kvpress's compression_ratio). Bytes kept are measured from the
tensors each cache holds after prefill; a press whose bytes stay at 100 % while it claims a ratio is
flagged "masked" (it hides keys from attention but stores them)."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from common import out_arg, peer_arg, write_results  # benchmarks/ is on sys.path when run as a script
from peak_memory import peak_bytes

import trimformer
from trimformer import kv
from trimformer.data import doc_pools
from trimformer.evaluate import compare
from trimformer.models.load import cache_dir

OURS = ["streaming", "a2sf", "observed-attention", "vatp", "snapkv", "tova", "knorm", "expected-attention", "rolling",
        "random", "think", "perhead-snapkv", "perhead-observed-attention"]
PEER = ["streaming", "snapkv", "tova", "knorm", "expected-attention", "observed-attention", "random", "think",
        "adakv-snapkv"]
NAMES = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas"]


def make_press(name: str, ratio: float) -> kv.Press:
    if name.startswith("perhead-"):
        return kv.PerHead(name.removeprefix("perhead-"), ratio=ratio)
    if name.startswith("perlayer-"):
        return kv.PerLayer(name.removeprefix("perlayer-"), ratio=ratio)
    return kv.build_press(name, ratio)


def needles(tok, pool: torch.Tensor, n: int, length: int, seed: int = 0):
    """(haystack with needle, question, answer) at depths spread over 10 %..90 %."""
    rng = random.Random(seed)
    depths = [0.1 + 0.8 * i / max(n - 1, 1) for i in range(n)]
    out = []
    for i, d in enumerate(depths):
        name, code = NAMES[i % len(NAMES)], str(rng.randint(10000, 99999))
        needle = torch.tensor(tok(f"\nThe secret code of {name} is {code}.\n", add_special_tokens=False)["input_ids"])
        question = torch.tensor(tok(f"\n\nQuestion: what is the secret code of {name}?\nAnswer: The secret code of "
                                    f"{name} is", add_special_tokens=False)["input_ids"])
        hay = pool[i * length: (i + 1) * length - needle.numel()]
        at = int(d * hay.numel())
        out.append({"depth": round(d, 2), "hay": torch.cat([hay[:at], needle, hay[at:]]), "question": question,
                    "answer": code})
    return out


@torch.no_grad()
def greedy(model, cache, logits: torch.Tensor, n: int) -> list[int]:
    out, tok = [], logits.argmax().item()
    for _ in range(n):
        out.append(tok)
        tok = model(torch.tensor([[tok]]), cache=cache).logits[0, -1].argmax().item()
    return out


@torch.no_grad()
def run_ours(model, contexts, continuations, presses, ratios, hay_cases, answer_tokens,
             needle_ratios, deadline: float) -> tuple[dict, dict]:
    rows: dict[str, dict] = {}
    full_rows = {"nll": 0.0, "n": 0, "needle": []}
    for c, (ctx, cont) in enumerate(zip(contexts, continuations)):
        T = ctx.numel()
        t = time.perf_counter()
        full = model(ctx[None], use_cache=True)
        t_full = time.perf_counter() - t
        full_bytes = sum(x.numel() * x.element_size() for layer in full.cache.layers for x in (layer.keys, layer.values))
        ref = F.log_softmax(torch.cat([full.logits[0, -1:], model(cont[None, :-1], cache=full.cache).logits[0]]), -1)
        full_rows["nll"] += F.nll_loss(ref, cont, reduction="sum").item()
        full_rows["n"] += cont.numel()
        full_rows["full_bytes"] = full_bytes
        del full
        for name in presses:
            for r in ratios:
                row = rows.setdefault(f"{name}@{r}", {"press": name, "ratio": r, "nll": 0.0, "kl": 0.0, "agree": 0,
                                                      "n": 0, "bytes": [], "prefill_ratio": [], "overhead": [],
                                                      "needle_agnostic": [], "needle_aware": []})
                with kv.press(model, make_press(name, r)) as s:
                    t = time.perf_counter()
                    cache = s.new_cache()
                    last = model(ctx[None], cache=cache).logits[0, -1:]
                    t_pre = time.perf_counter() - t
                    row["bytes"].append(cache.nbytes / full_bytes)
                    row["overhead"].append(cache.overhead_bytes / full_bytes)
                    logp = F.log_softmax(torch.cat([last, model(cont[None, :-1], cache=cache).logits[0]]), -1)
                # per continuation position: KL(full cache || compressed), top-1 agreement (summed here, averaged below)
                kl, agree = compare(logp, ref)
                row["nll"] += F.nll_loss(logp, cont, reduction="sum").item()
                row["kl"] += kl
                row["agree"] += agree
                row["n"] += cont.numel()
                row["prefill_ratio"].append(t_pre / t_full)
        print(f"ours: context {c + 1}/{len(contexts)} done (T={T})", file=sys.stderr, flush=True)
    for case in hay_cases:
        if time.time() > deadline:
            print("ours: time budget spent, needle cases left out", file=sys.stderr, flush=True)
            break
        hay, q = case["hay"], case["question"]
        out = model(hay[None], use_cache=True)
        logits = model(q[None], cache=out.cache).logits[0, -1]
        full_rows["needle"].append(greedy(model, out.cache, logits, answer_tokens))
        for name in presses:
            for r in needle_ratios:
                row = rows[f"{name}@{r}"]
                with kv.press(model, make_press(name, r)) as s:
                    cache = s.prefill(hay[None])  # query-agnostic: the question is not seen by the press
                    logits = model(q[None], cache=cache).logits[0, -1]
                    row["needle_agnostic"].append(greedy(model, cache, logits, answer_tokens))
                    cache = s.new_cache()  # query-aware: haystack + question compressed together
                    logits = model(torch.cat([hay, q])[None], cache=cache).logits[0, -1]
                    row["needle_aware"].append(greedy(model, cache, logits, answer_tokens))
    for row in rows.values():
        row["ppl"] = math.exp(row["nll"] / row["n"])
        row["kl"] /= row["n"]
        row["top1_agree"] = row.pop("agree") / row["n"]
        row["bytes_kept"] = statistics.mean(row.pop("bytes"))
        row["index_overhead"] = statistics.mean(row.pop("overhead"))
        row["prefill_time_ratio"] = statistics.median(row.pop("prefill_ratio"))
    full_rows["ppl"] = math.exp(full_rows["nll"] / full_rows["n"])
    return rows, full_rows




def decode_steps(model, feed: torch.Tensor, cache) -> None:
    for i in range(feed.shape[1]):
        model(feed[:, i:i + 1], cache=cache)


@torch.no_grad()
def memory_split(model, ctx: torch.Tensor, presses: list[str], ratio: float, steps: int = 4) -> dict:
    """Peak bytes above the model's own during prefill (cache built + transients) and during `steps`
    one-token decode steps (cache held + transients), per press at `ratio` and for the full cache."""
    feed = ctx[:steps][None]
    out = {}
    for name in ["full"] + presses:
        if name == "full":
            cache, pre = peak_bytes(lambda: model(ctx[None], use_cache=True).cache)
            held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
            _, dec = peak_bytes(partial(decode_steps, model, feed, cache))
        else:
            with kv.press(model, make_press(name, ratio)) as s:
                cache, pre = peak_bytes(lambda: s.prefill(ctx[None]))
                held = cache.reserved_bytes
                _, dec = peak_bytes(partial(decode_steps, model, feed, cache))
        out[name] = {"prefill_peak": pre, "decode_peak": held + dec, "cache_after_prefill": held}
        del cache
    return out


@torch.no_grad()
def decode_speed(model, ctx: torch.Tensor, batch: int, steps: int, repeats: int, presses: list[str]) -> dict:
    """Prefill time (one run each) and median time per decode step on a cache of the context: full
    DynamicCache vs pressed at 0.5. Each cache is prefilled once; then `repeats` rounds alternate over
    the caches, `steps` one-token forwards each (hooks added before the clock starts)."""
    ids = ctx[None].repeat(batch, 1)
    feed = ctx[:steps * repeats][None].repeat(batch, 1)
    names = ["full", *presses]
    caches, prefill_s = {}, {}
    for name in names:
        t = time.perf_counter()
        if name == "full":
            caches[name] = model(ids, use_cache=True).cache
        else:
            with kv.press(model, make_press(name, 0.5)) as s:
                caches[name] = s.prefill(ids)
        prefill_s[name] = time.perf_counter() - t
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        chunk = feed[:, r * steps:(r + 1) * steps]
        for name in names:
            if name == "full":
                t = time.perf_counter()
                for i in range(steps):
                    model(chunk[:, i:i + 1], cache=caches[name])
            else:
                with kv.press(model, make_press(name, 0.5)):
                    t = time.perf_counter()
                    for i in range(steps):
                        model(chunk[:, i:i + 1], cache=caches[name])
            times[name].append((time.perf_counter() - t) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": batch, "steps": steps, "repeats": repeats, "median_step_s": med, "prefill_s": prefill_s,
            "ratio_vs_full": {k: med[k] / med["full"] for k in presses},
            "prefill_ratio_vs_full": {k: prefill_s[k] / prefill_s["full"] for k in presses}}


def answered(tok, runs: list[list[int]], cases) -> float:
    return sum(c["answer"] in tok.decode(r) for r, c in zip(runs, cases)) / max(len(cases), 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, default=8)
    ap.add_argument("--context-len", type=int, default=1536)
    ap.add_argument("--continuation-len", type=int, default=256)
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--presses", default=",".join(OURS))
    ap.add_argument("--peer-presses", default=",".join(PEER))
    ap.add_argument("--needles", type=int, default=9, help="needle depths from 10 %% to 90 %%")
    ap.add_argument("--needle-ratios", default=None, help="ratios with a needle test (default: all)")
    ap.add_argument("--answer-tokens", type=int, default=6)
    ap.add_argument("--speed-batches", default="1,4")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--speed-steps", type=int, default=32)
    ap.add_argument("--speed-repeats", type=int, default=5)
    ap.add_argument("--speed-presses", default="snapkv,perhead-snapkv,observed-attention")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-presses", default="snapkv,perhead-snapkv,observed-attention,expected-attention,rolling")
    peer_arg(ap, "/work/peers/kvpress/bin/python")
    ap.add_argument("--time-budget-min", type=float, default=None,
                    help="after this, needle cases not yet run are left out (and said so)")
    out_arg(ap, "p3_kv")
    args = ap.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    needle_ratios = [float(r) for r in args.needle_ratios.split(",")] if args.needle_ratios else ratios
    presses = [p for p in args.presses.split(",") if p]
    peer_presses = [p for p in args.peer_presses.split(",") if p]
    for p in presses:
        make_press(p, 0.5)  # unknown names fail before any work

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    model, tok = trimformer.load("smollm2-135m", with_tokenizer=True)
    model.eval()
    pool = doc_pools(tok)[1]
    span = args.context_len + args.continuation_len
    wins = trimformer.data.windows(pool, args.contexts, span, what="the evaluation pool")
    contexts, conts = wins[:, :args.context_len], wins[:, args.context_len:]
    cases = needles(tok, pool[args.contexts * span:], args.needles, args.context_len)

    deadline = time.time() + 60 * args.time_budget_min if args.time_budget_min else float("inf")
    peer = None
    threads = torch.get_num_threads()
    if not args.no_peer:
        tmp = Path(tempfile.mkdtemp(prefix="p3kv"))
        torch.save({"model_dir": str(cache_dir("smollm2-135m")), "contexts": list(contexts), "continuations":
                    list(conts), "presses": peer_presses, "ratios": ratios, "needle_ratios": needle_ratios, "threads": max(threads // 2, 1), "deadline": deadline,
                    "needles": [(c["hay"], c["question"]) for c in cases], "answer_tokens": args.answer_tokens,
                    "memory_ratio": None if args.no_memory else 0.5},
                   tmp / "in.pt")
        peer = subprocess.Popen([args.peer_python, str(Path(__file__).with_name("p3_kv_peer.py")),
                                 str(tmp / "in.pt"), str(tmp / "out.json")], env={**os.environ, "PYTHONPATH": ""})
        torch.set_num_threads(max(threads // 2, 1))  # share the cores with the peer while it runs

    t0 = time.perf_counter()
    rows, full = run_ours(model, contexts, conts, presses, ratios, cases, args.answer_tokens, needle_ratios,
                          deadline)
    ours_s = time.perf_counter() - t0
    peer_rows, peer_err, peer_memory = [], None, {}
    if peer is not None:
        if peer.wait() != 0:
            peer_err = f"kvpress subprocess exited with {peer.returncode}"
        else:
            peer_out = json.loads((tmp / "out.json").read_text())
            peer_rows, peer_memory = peer_out["rows"], peer_out.get("memory", {})
    torch.set_num_threads(threads)
    speed, memory = [], {}
    if not args.no_speed:
        sp = [p for p in args.speed_presses.split(",") if p]
        speed = [decode_speed(model, contexts[0], int(b), args.speed_steps, args.speed_repeats, sp)
                 for b in args.speed_batches.split(",")]
    if not args.no_memory:
        memory = memory_split(model, contexts[0], [p for p in args.memory_presses.split(",") if p], 0.5)

    for src in (rows.values(), peer_rows):
        for row in src:
            for k in ("needle_agnostic", "needle_aware"):
                row[k + "_cases"] = len(row[k])
                row[k] = answered(tok, row[k], cases[:len(row[k])]) if row[k] else None
            row["masked"] = row["bytes_kept"] > 0.99 and row["ratio"] > 0
    result = {
        "protocol": {"model": "smollm2-135m", "contexts": args.contexts, "context_len": args.context_len,
                     "continuation_len": args.continuation_len, "ratios": ratios, "needles": args.needles, "needle_ratios": needle_ratios,
                     "needle_depths": [c["depth"] for c in cases], "ratio_meaning": "share of the cache removed",
                     "reduced": args.contexts < 8 or args.needles < 9 or needle_ratios != ratios},
        "full_cache": {"ppl": full["ppl"], "kv_bytes": full["full_bytes"],
                       "needle": answered(tok, full["needle"], cases[:len(full["needle"])]) if full["needle"] else None,
                       "needle_cases": len(full["needle"])},
        "trimformer": list(rows.values()), "kvpress": peer_rows, "kvpress_error": peer_err,
        "decode_speed": speed, "memory": memory, "kvpress_memory": peer_memory, "ours_wall_s": ours_s,
        "command": "PYTHONPATH=src python benchmarks/p3_kv.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = write_results(args.out, result, markdown(result), indent=1)
    plot(result, out.with_suffix(".png"))
    print(markdown(result))
    return 0


def markdown(res: dict) -> str:
    p, f = res["protocol"], res["full_cache"]
    lines = [f"# P3: KV-cache compression, smollm2-135m{' (REDUCED protocol)' if p['reduced'] else ''}", "",
             f"{p['contexts']} contexts x {p['context_len']} tokens + {p['continuation_len']} continuation tokens; "
             f"needles at depths {p['needle_depths']}. ratio = share of the cache removed. "
             f"Full cache: ppl {f['ppl']:.3f}, KV {f['kv_bytes'] / 2**20:.1f} MiB/context, needle {pct(f['needle'])} "
             f"({f['needle_cases']} cases; each row's needle share is over the cases it ran, see JSON).",
             "", f"Command: `{res['command']}`", "",
             "| tool | press | ratio | cont. ppl | Δppl | KL | top-1 | KV bytes kept | needle (agnostic) "
             "| needle (aware) | prefill time vs full |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = [("trimformer", r) for r in res["trimformer"]] + [("kvpress 0.5.5", r) for r in res["kvpress"]]
    for tool, r in sorted(rows, key=lambda x: (x[1]["ratio"], x[1]["press"], x[0])):
        kept = f"{r['bytes_kept']:.1%}" + (" (masked: all stored)" if r["masked"] else "")
        lines.append(f"| {tool} | {r['press']} | {r['ratio']} | {r['ppl']:.3f} | {r['ppl'] - f['ppl']:+.3f} | "
                     f"{r['kl']:.4f} | {r['top1_agree']:.1%} | {kept} | {pct(r['needle_agnostic'])} | "
                     f"{pct(r['needle_aware'])} | {r['prefill_time_ratio']:.2f} |")
    if res.get("kvpress_error"):
        lines += ["", f"kvpress run failed: {res['kvpress_error']}"]
    for s in res["decode_speed"]:
        lines += ["", f"Batch {s['batch']}, cache of {p['context_len']} tokens, ratio 0.5 vs full: decode step time "
                  f"(median of {s['repeats']} alternating rounds x {s['steps']} steps) "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in s["ratio_vs_full"].items())
                  + f" (full: {s['median_step_s']['full'] * 1e3:.1f} ms/step); prefill time (one run) "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in s["prefill_ratio_vs_full"].items())
                  + f" (full: {s['prefill_s']['full']:.1f} s)"]
    if res.get("memory"):
        lines += ["", "Peak memory above the model's own, batch 1, ratio 0.5 (CPU profiler allocation events): "
                  "prefill = cache built + transients; decode = cache held (with slack) + transients of 4 steps.",
                  "", ""]
        mem = [("trimformer", n, m) for n, m in res["memory"].items()]
        mem += [("kvpress 0.5.5", n, m) for n, m in res.get("kvpress_memory", {}).items()]
        lines[-1:] = ["| tool | cache | prefill peak | decode peak | cache after prefill |", "|---|---|---|---|---|"]
        for tool, name, m in mem:
            lines.append(f"| {tool} | {name} | {m['prefill_peak'] / 2**20:.1f} MiB | {m['decode_peak'] / 2**20:.1f} "
                         f"MiB | {m['cache_after_prefill'] / 2**20:.1f} MiB |")
    best = {}
    for tool, r in rows:
        if r["ratio"] == 0.5 and not r["masked"]:
            if tool not in best or r["ppl"] < best[tool]["ppl"]:
                best[tool] = r
    if best:
        lines += ["", "Best press that really saves memory at ratio 0.5: "
                  + "; ".join(f"{t}: {r['press']} ppl {r['ppl']:.3f} ({r['bytes_kept']:.1%} bytes)" for t, r in best.items())]
    return "\n".join(lines) + "\n"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for tool, style in (("trimformer", "-o"), ("kvpress", "--x")):
        by: dict[str, list] = {}
        for r in res[tool]:
            by.setdefault(r["press"], []).append(r)
        for name, rs in by.items():
            rs.sort(key=lambda r: r["bytes_kept"])
            ax.plot([r["bytes_kept"] for r in rs], [r["ppl"] for r in rs], style, label=f"{tool}: {name}", ms=4)
    ax.axhline(res["full_cache"]["ppl"], color="k", lw=0.8, label="full cache")
    ax.set_xlabel("KV bytes physically kept (share of full cache)")
    ax.set_ylabel("continuation perplexity")
    ax.set_yscale("log")
    ax.set_title("P3 smollm2-135m: quality vs kept memory (masked presses sit at 100 %)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
