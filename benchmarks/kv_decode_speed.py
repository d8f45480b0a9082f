"""Decode step time of a pressed KV cache vs the uncompressed cache at the same context length
(issue #7 target: a cache compressed to 0.5 decodes no slower than the full one).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/kv_decode_speed.py --context 2048 --batches 1,4

Each cache is prefilled once; then `repeats` rounds alternate over the caches, each round timing `steps`
single-token forwards per cache (so every cache grows by the same tokens); median over rounds.
"full" is transformers' DynamicCache; "ratio0" is our PressCache holding everything. Also reports the
bytes each pressed cache holds after decoding, and its reserved slack (preallocated growth)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from common import out_arg, write_results  # benchmarks/ is on sys.path when run as a script

import trimformer
from trimformer import kv
from trimformer.data import doc_pools


def make(name: str) -> kv.Press | None:
    if name == "full":
        return None
    if name == "ratio0":
        return kv.SnapKV(0.0)
    if name.startswith("perhead-"):
        return kv.PerHead(name.removeprefix("perhead-"), ratio=0.5)
    return kv.build_press(name, 0.5)


@torch.no_grad()
def prefill(model, ids: torch.Tensor, name: str):
    press = make(name)
    if press is None:
        return model(ids, use_cache=True).cache
    with kv.press(model, press) as s:
        return s.prefill(ids)


@torch.no_grad()
def decode(model, cache, feed: torch.Tensor, name: str) -> float:
    """Seconds per single-token forward over `feed` (B, steps), the press active for pressed caches."""
    press = make(name)
    if press is None:
        t = time.perf_counter()
        for i in range(feed.shape[1]):
            model(feed[:, i:i + 1], cache=cache)
    else:
        with kv.press(model, press):  # hooks added before the clock starts
            t = time.perf_counter()
            for i in range(feed.shape[1]):
                model(feed[:, i:i + 1], cache=cache)
    return (time.perf_counter() - t) / feed.shape[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--presses", default="ratio0,snapkv,perhead-snapkv")
    out_arg(ap, "kv_decode_speed")
    args = ap.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    model, tok = trimformer.load("smollm2-135m", with_tokenizer=True)
    model.eval()
    pool = doc_pools(tok)[1]
    ctx, feed = pool[:args.context], pool[args.context:args.context + args.steps * args.repeats]
    names = ["full"] + [p for p in args.presses.split(",") if p]
    result = {"context": args.context, "steps": args.steps, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "batches": []}
    for b in (int(x) for x in args.batches.split(",")):
        ids, f = ctx[None].repeat(b, 1), feed[None].repeat(b, 1)
        times: dict[str, list[float]] = {n: [] for n in names}
        caches = {n: prefill(model, ids, n) for n in names}  # one prefill each; every repeat appends `steps`
        for r in range(args.repeats):
            for n in names:  # alternating: each repeat runs every cache once, same tokens
                times[n].append(decode(model, caches[n], f[:, r * args.steps:(r + 1) * args.steps], n))
        info = {n: {"kv_bytes": c.nbytes, "reserved_bytes": c.reserved_bytes} for n, c in caches.items()
                if n != "full"}
        med = {n: statistics.median(v) for n, v in times.items()}
        row = {"batch": b, "median_step_ms": {n: 1e3 * v for n, v in med.items()},
               "ratio_vs_full": {n: med[n] / med["full"] for n in names[1:]}, "memory": info}
        result["batches"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    result["command"] = ("OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/kv_decode_speed.py "
                         + " ".join(argv if argv is not None else sys.argv[1:]))
    out = Path(args.out)
    write_results(out, result, markdown(result), indent=1)
    print(markdown(result))
    return 0


def markdown(res: dict) -> str:
    lines = [f"# KV decode step time, smollm2-135m, context {res['context']} (ratio 0.5 vs full cache)", "",
             f"Median of {res['repeats']} alternating runs x {res['steps']} decode steps, "
             f"{res['threads']} thread(s). full = transformers DynamicCache; ratio0 = PressCache keeping all.", "",
             f"Command: `{res['command']}`", "",
             "| batch | cache | ms/step | vs full | KV bytes held | reserved (incl. growth slack) |",
             "|---|---|---|---|---|---|"]
    for row in res["batches"]:
        for n, ms in row["median_step_ms"].items():
            m = row["memory"].get(n, {})
            held = f"{m['kv_bytes'] / 2**20:.1f} MiB" if m else "-"
            res_ = f"{m['reserved_bytes'] / 2**20:.1f} MiB (+{m['reserved_bytes'] / m['kv_bytes'] - 1:.1%})" if m else "-"
            ratio = "1.00" if n == "full" else f"{row['ratio_vs_full'][n]:.2f}"
            lines.append(f"| {row['batch']} | {n} | {ms:.1f} | {ratio} | {held} | {res_} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
