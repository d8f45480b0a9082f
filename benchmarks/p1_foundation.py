"""BENCHMARK.md P1 for the foundation methods on smollm2-135m: dense, magnitude, Wanda (unstructured, 2:4).

    python benchmarks/p1_foundation.py                      # full protocol: 64 calib / 64 eval / 16 KL windows
    python benchmarks/p1_foundation.py --calib-windows 8 --eval-windows 8 --kl-windows 4   # quick look

Writes benchmarks/results/p1_foundation.json and .md. The dense model is evaluated once; each method
prunes a fresh copy of it with the same calibration windows.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

from common import environment, out_arg, references, window_args, write_results

import trimformer
from trimformer.evaluate import cost, perplexity
from trimformer.evaluate.speed import peak_rss_bytes


def parse_methods(text: str) -> list[tuple[str, dict]]:
    """'magnitude:0.5,wanda:2:4' -> [(magnitude, {sparsity: 0.5}), (wanda, {pattern: '2:4'})]."""
    out = []
    for item in text.split(","):
        name, _, arg = item.partition(":")
        out.append((name, {"pattern": arg} if ":" in arg else {"sparsity": float(arg or 0.5)}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="magnitude:0.5,wanda:0.5,wanda:2:4")
    window_args(ap, calib="--calib-windows", ppl="--eval-windows", kl="--kl-windows", length=True)
    out_arg(ap, "p1_foundation")
    args = ap.parse_args()

    dense, tok = trimformer.load(args.model, with_tokenizer=True)
    calib = trimformer.data.calibration_windows(tok, n=args.calib_windows, length=args.length)
    ev = trimformer.data.evaluation_windows(tok, n=args.eval_windows, length=args.length)
    ref = references(dense, tok, doc=args.kl_windows, length=args.length)["doc"]
    rows = [{"method": "dense", "ppl_doc": perplexity(dense, ev), "kl_doc": 0.0, "top1_agree": 1.0,
             "prune_s": 0.0, **{k: v for k, v in cost(dense, args.length).items() if k != "flops_context"}}]
    print(rows[-1])
    for name, settings in parse_methods(args.methods):
        model = copy.deepcopy(dense)
        method = trimformer.build(name, settings)
        t0 = time.perf_counter()
        trimformer.prune_(model, method, calibration=calib if method.needs_calibration else None)
        prune_s = time.perf_counter() - t0
        s = ref.score(model)  # KL(dense || pruned) and top-1 over the first --kl-windows windows
        label = f"{name} {settings.get('pattern') or settings['sparsity']}"
        rows.append({"method": label, "ppl_doc": perplexity(model, ev), "kl_doc": s["kl"], "top1_agree": s["top1_agree"],
                     "prune_s": prune_s, **{k: v for k, v in cost(model, args.length).items() if k != "flops_context"}})
        print(rows[-1])
        del model
    env = environment()
    result = {"protocol": "BENCHMARK.md P1", "model": args.model, "calib_windows": args.calib_windows,
              "eval_windows": args.eval_windows, "kl_windows": args.kl_windows, "window_tokens": args.length,
              **env, "peak_rss_bytes": peak_rss_bytes(), "rows": rows}
    md = [f"P1 on `{args.model}`: {args.calib_windows} calibration / {args.eval_windows} evaluation / "
          f"{args.kl_windows} KL windows of {args.length} tokens; {env['threads']} threads.", "",
          "| method | ppl_doc | kl_doc | top1_agree | prune s | non-zeros | FLOPs/token (non-zero) |",
          "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        md.append(f"| {r['method']} | {r['ppl_doc']:.2f} | {r['kl_doc']:.3f} | {100 * r['top1_agree']:.1f} % | "
                  f"{r['prune_s']:.0f} | {r['nonzeros']:,} | {r['flops_per_token_nonzero'] / 1e6:.0f} M |")
    write_results(args.out, result, "\n".join(md) + "\n")
    print("\n".join(md))
    assert all(math.isfinite(r["ppl_doc"]) for r in rows)


if __name__ == "__main__":
    main()
