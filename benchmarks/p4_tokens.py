"""BENCHMARK.md P4: token pruning / merging in minilm-l6, dense side by side in one run.

512 doc-corpus paragraphs of 32-256 tokens (corpus order), batch 32; sentence embeddings by mean
pooling with every method restoring full length after the last block (ToMe-style copy). Settings
with `flops` solve the geometric keep for that share of dense block FLOPs; the table gives both. Quality:
cosine to dense (mean, 5th percentile), share of paragraphs whose dense nearest neighbour stays in the
pruned top 3 (the exact-neighbour share is printed too; it is below this set's noise: near-ties).
Cost: block FLOPs ratio (scoring included) and measured latency ratio at batch 32 (median of
alternating dense / pruned runs). No peer: ToMe / Zero-TPrune ship no installable package for text.

    PYTHONPATH=src python benchmarks/p4_tokens.py                       # the reported run
    PYTHONPATH=src python benchmarks/p4_tokens.py --paragraphs 64       # quick
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from common import out_arg, threads_arg, write_results  # benchmarks/ is on sys.path when run as a script

import trimformer
from trimformer import tokens
from trimformer.evaluate.encoder import evaluate_encoder, paragraph_batches

METHODS = [  # one FLOPs budget (0.6 = the "40 % fewer") for every method, plus merge's frontier
    ("merge", {"keep": 0.25}),  # ToMe as in the last report (keys, geometric keep)
    ("merge", {"flops": 0.6}),  # ToMe, keys, keep solved for the budget
    ("merge", {"flops": 0.6, "features": "hidden"}),
    ("merge", {"flops": 0.7, "features": "hidden"}),
    ("merge", {"flops": 0.8, "features": "hidden"}),
    ("merge", {"flops": 0.5, "features": "hidden"}),
    # content-adaptive: merge only pairs with cosine >= threshold (FLOPs vary with the text; 0.47 was
    # picked on the first 128 paragraphs to land near 0.6)
    ("merge", {"keep": 0.02, "threshold": 0.47, "features": "hidden"}),
    ("merge", {"keep": 0.02, "threshold": 0.55, "features": "hidden"}),
    ("transform", {"flops": 0.6, "features": "hidden"}),
    ("transform", {"flops": 0.7, "features": "hidden"}),
    ("zero-tprune", {"flops": 0.6}),
    ("acc", {"flops": 0.6}),
    ("acc", {"speedup": 1.5}),
    ("coverage", {"mass": 0.9}),  # content-based progressive: FLOPs follow the text
    ("coverage", {"mass": 0.95}),
]


def protocol_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The P4 settings every P4 script takes (paragraphs, batch, latency timing, threads)."""
    p.add_argument("--paragraphs", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--timing-batches", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    return threads_arg(p, default=1)


def main(argv: list[str] | None = None) -> dict:
    p = protocol_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    out_arg(p, "p4_tokens")
    p.add_argument("--only", nargs="+", metavar="METHOD", help="run only these methods' rows (e.g. coverage merge)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = trimformer.load("minilm-l6", with_tokenizer=True)
    batches = paragraph_batches(tok, args.paragraphs, args.batch)
    methods = [m for m in METHODS if not args.only or m[0] in args.only]
    if not methods:
        p.error(f"--only {args.only}: no such method in this benchmark ({', '.join(dict.fromkeys(m[0] for m in METHODS))})")
    rows = evaluate_encoder(model, batches, methods, args.timing_batches, args.reps, prune=tokens.prune)
    for r in rows:
        print(json.dumps(r), flush=True)
    result = {
        "benchmark": "P4", "model": "minilm-l6", "paragraphs": args.paragraphs, "batch": args.batch,
        "timing_batches": args.timing_batches, "reps": args.reps, "threads": args.threads, "rows": rows,
        "command": "PYTHONPATH=src python benchmarks/p4_tokens.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    write(result, Path(args.out))
    return result


def _label(r: dict) -> str:
    s = r["settings"]
    if s.get("mass") is not None:
        return f"mass {s['mass']} (content-based)"
    if s.get("speedup"):
        return f"speedup {s['speedup']}"
    extra = f", {s['features']}" if "features" in s else ""
    if s.get("threshold") is not None:
        return f"threshold {s['threshold']} (cap keep {s['keep']}){extra}"
    return (f"flops {s['flops']} (keep {r['keep']:.3f}){extra}" if s.get("flops") and "keep" in r
            else f"keep {s.get('keep')}{extra}")


def write(result: dict, out: Path) -> None:
    lines = [
        f"# P4 token pruning: {result['model']}, {result['paragraphs']} paragraphs, batch {result['batch']}",
        "",
        f"`{result['command'].strip()}`; {result['threads']} threads; latency = median of alternating dense / "
        f"pruned runs over {result['timing_batches']} batches x {result['reps']} reps.",
        "",
        "| method | setting | cos mean | cos p5 | NN in top 3 | NN unchanged | FLOPs ratio | latency ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        "| dense | | 1.0000 | 1.0000 | 1.000 | 1.000 | 1.000 | 1.000 |",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {_label(r)} | {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['method']} | {_label(r)} | {r['cos_mean']:.4f} | {r['cos_p5']:.4f} | {r['nn_top3']:.3f} | "
                     f"{r['nn_unchanged']:.3f} | {r['flops_ratio']:.3f} | {r['latency_ratio']:.3f} |")
    write_results(out, result, "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ok = [r for r in result["rows"] if "error" not in r]
        def group(r: dict) -> str:
            return r["method"] + (" threshold" if r["settings"].get("threshold") is not None else "")

        for name in dict.fromkeys(group(r) for r in ok):
            rs = [r for r in ok if group(r) == name]
            ax.plot([1 / r["latency_ratio"] for r in rs], [r["cos_mean"] for r in rs], "o", label=f"{name} (measured)")
            ax.plot([1 / r["flops_ratio"] for r in rs], [r["cos_mean"] for r in rs], "x", color=ax.lines[-1].get_color(),
                    label=f"{name} (FLOPs)")
        ax.plot([1.0], [1.0], "*", ms=10, label="dense")
        ax.axhline(0.98, ls=":", lw=0.8, color="grey")
        ax.set_xlabel("speedup vs dense")
        ax.set_ylabel("mean embedding cosine")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
