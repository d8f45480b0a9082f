"""BENCHMARK.md P1 for the foundation methods on smollm2-135m: dense, magnitude, Wanda (unstructured, 2:4).

    python benchmarks/p1_foundation.py                      # full protocol: 64 calib / 64 eval / 16 KL windows
    python benchmarks/p1_foundation.py --calib-windows 8 --eval-windows 8 --kl-windows 4   # quick look

Writes benchmarks/results/p1_foundation.json and .md. The dense model is evaluated once; each method
prunes a fresh copy of it with the same calibration windows.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import trimformer
from trimformer.evaluate import cost, perplexity
from trimformer.evaluate.speed import peak_rss_bytes
from trimformer.io import atomic_file


def parse_methods(text: str) -> list[tuple[str, dict]]:
    """'magnitude:0.5,wanda:2:4' -> [(magnitude, {sparsity: 0.5}), (wanda, {pattern: '2:4'})]."""
    out = []
    for item in text.split(","):
        name, _, arg = item.partition(":")
        out.append((name, {"pattern": arg} if ":" in arg else {"sparsity": float(arg or 0.5)}))
    return out


@torch.no_grad()
def logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(input_ids=ids[None], use_cache=False).logits[0].float(), -1)  # (T, V)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="magnitude:0.5,wanda:0.5,wanda:2:4")
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--kl-windows", type=int, default=16)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--out", default="benchmarks/results/p1_foundation")
    args = ap.parse_args()

    dense, tok = trimformer.load(args.model, with_tokenizer=True)
    calib = trimformer.data.calibration_windows(tok, n=args.calib_windows, length=args.length)
    ev = trimformer.data.evaluation_windows(tok, n=args.eval_windows, length=args.length)
    ref_lp = [logprobs(dense, w) for w in ev[: args.kl_windows]]
    rows = [{"method": "dense", "ppl_doc": perplexity(dense, ev), "kl_doc": 0.0, "top1_agree": 1.0,
             "prune_s": 0.0, **{k: v for k, v in cost(dense, args.length).items() if k != "flops_context"}}]
    print(rows[-1])
    for name, settings in parse_methods(args.methods):
        model = copy.deepcopy(dense)
        method = trimformer.build(name, settings)
        t0 = time.perf_counter()
        trimformer.prune_(model, method, calibration=calib if method.needs_calibration else None)
        prune_s = time.perf_counter() - t0
        kl = agree = n = 0.0
        for w, p in zip(ev[: args.kl_windows], ref_lp):
            q = logprobs(model, w)
            kl += F.kl_div(q, p, log_target=True, reduction="sum").item()
            agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
            n += w.numel()
        label = f"{name} {settings.get('pattern') or settings['sparsity']}"
        rows.append({"method": label, "ppl_doc": perplexity(model, ev), "kl_doc": kl / n, "top1_agree": agree / n,
                     "prune_s": prune_s, **{k: v for k, v in cost(model, args.length).items() if k != "flops_context"}})
        print(rows[-1])
        del model
    result = {"protocol": "BENCHMARK.md P1", "model": args.model, "calib_windows": args.calib_windows,
              "eval_windows": args.eval_windows, "kl_windows": args.kl_windows, "window_tokens": args.length,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "peak_rss_bytes": peak_rss_bytes(),
              "rows": rows}
    out = Path(args.out)
    atomic_file(out.with_suffix(".json"), json.dumps(result, indent=2))
    md = [f"P1 on `{args.model}`: {args.calib_windows} calibration / {args.eval_windows} evaluation / "
          f"{args.kl_windows} KL windows of {args.length} tokens; {torch.get_num_threads()} threads.", "",
          "| method | ppl_doc | kl_doc | top1_agree | prune s | non-zeros | FLOPs/token (non-zero) |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        md.append(f"| {r['method']} | {r['ppl_doc']:.2f} | {r['kl_doc']:.3f} | {100 * r['top1_agree']:.1f} % | "
                  f"{r['prune_s']:.0f} | {r['nonzeros']:,} | {r['flops_per_token_nonzero'] / 1e6:.0f} M |")
    atomic_file(out.with_suffix(".md"), "\n".join(md) + "\n")
    print("\n".join(md))
    assert all(math.isfinite(r["ppl_doc"]) for r in rows)


if __name__ == "__main__":
    main()
