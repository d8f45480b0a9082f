"""BENCHMARK.md P4 with merge-aware distillation: minilm-l6 dense, training-free merge, and merge after
fine-tuning the model with merging on (recover/merging.py), side by side in one run.

The distilled model trains on doc-corpus paragraphs that are neither among the 512 P4 paragraphs nor
copies of one (`training_paragraphs`); its targets are the ORIGINAL model's dense embeddings, and every
row is scored against the original dense model. FLOPs and latency ratios as in p4_tokens.py (block
FLOPs, scoring included; median of alternating dense / pruned runs at batch 32).

    PYTHONPATH=src python benchmarks/p4_tokens_distill.py                    # the reported run
    PYTHONPATH=src python benchmarks/p4_tokens_distill.py --minutes 2 --paragraphs 64   # quick
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import trimformer
from trimformer import tokens
from trimformer.config import settings as settings_of
from trimformer.data import training_paragraphs
from trimformer.evaluate.encoder import embed, evaluate_encoder, paragraph_batches
from trimformer.recover import DistillConfig, distill_merge_

sys.path.insert(0, str(Path(__file__).parent))
from common import out_arg, write_results  # noqa: E402
from p4_tokens import protocol_args  # noqa: E402

TRAINED = {"keep": 0.02, "threshold": 0.47, "features": "hidden"}  # the best training-free setting at FLOPs ~0.6
FIXED = {"flops": 0.6, "features": "hidden"}  # a fixed schedule: FLOPs 0.60 whatever the text
# The frontier around the target, for both models (the distilled one was trained for TRAINED only).
FRONTIER = [{"keep": 0.02, "threshold": 0.55, "features": "hidden"}, {"flops": 0.7, "features": "hidden"},
            {"flops": 0.8, "features": "hidden"}]


def main(argv: list[str] | None = None) -> dict:
    p = protocol_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--minutes", type=float, default=15.0, help="training time limit (the LR schedule follows it)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--loss", default="cos+sim+rank")
    p.add_argument("--train", default="all")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--docstrings", action="store_true", help="also train on standard-library docstrings")
    p.add_argument("--fixed", action="store_true", help="also distil for the fixed schedule (flops 0.6)")
    p.add_argument("--frontier", action="store_true", help="also score both models at FLOPs 0.64-0.8")
    out_arg(p, "p4_tokens_distill")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = trimformer.load("minilm-l6", with_tokenizer=True)
    batches = paragraph_batches(tok, args.paragraphs, args.batch)
    dense = embed(model, batches)  # the original model: every row is scored against it
    frontier = [("merge", f) for f in FRONTIER] if args.frontier else []
    methods = [("merge", TRAINED), ("merge", FIXED), *frontier]
    free = evaluate_encoder(model, batches, methods, args.timing_batches, args.reps, prune=tokens.prune)

    data = training_paragraphs(tok, docstrings=args.docstrings)
    cfg = DistillConfig(steps=args.steps, batch_size=args.train_batch, lr=args.lr, loss=args.loss, train=args.train,
                        max_minutes=args.minutes)
    rows = []
    for settings in [TRAINED] + ([FIXED] if args.fixed else []):
        student = copy.deepcopy(model)
        t0 = time.perf_counter()
        distill_merge_(student, "merge", data, cfg, settings=settings)
        summary = student.trimformer_history[-1]["result"]
        seconds = time.perf_counter() - t0
        scored = evaluate_encoder(student, batches, [("merge", settings), *(frontier if settings is TRAINED else [])],
                                  args.timing_batches, args.reps, reference=dense, prune=tokens.prune)
        L = summary["losses"]
        for row in scored:
            row.update({"distilled": True, "trained_for": settings, "train_seconds": seconds, "train_steps": len(L),
                        "loss_first": sum(L[:20]) / max(len(L[:20]), 1),
                        "loss_last": sum(L[-50:]) / max(len(L[-50:]), 1)})
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "benchmark": "P4 + merge-aware distillation", "model": "minilm-l6", "paragraphs": args.paragraphs,
        "batch": args.batch, "timing_batches": args.timing_batches, "reps": args.reps, "threads": args.threads,
        "train_paragraphs": len(data), "docstrings": args.docstrings, "train": settings_of(cfg),
        "rows": [{**r, "distilled": False} for r in free] + rows,
        "command": "PYTHONPATH=src python benchmarks/p4_tokens_distill.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    write(result, Path(args.out))
    return result


def _label(r: dict) -> str:
    s = r["settings"]
    if s.get("threshold") is not None:
        return f"threshold {s['threshold']}, hidden"
    return f"flops {s['flops']} (keep {r['keep']:.3f}), hidden"


def write(result: dict, out: Path) -> None:
    t = result["train"]
    lines = [
        f"# P4 with merge-aware distillation: {result['model']}, {result['paragraphs']} paragraphs, batch {result['batch']}",
        "",
        f"`{result['command'].strip()}`; {result['threads']} thread(s); latency = median of alternating dense / pruned "
        f"runs over {result['timing_batches']} batches x {result['reps']} reps. Distilled: fine-tuned with merging on, "
        f"towards the original dense embeddings, on {result['train_paragraphs']} doc-corpus paragraphs outside the "
        f"P4 set{' and standard-library docstring paragraphs' if result['docstrings'] else ''} (loss {t['loss']}, train {t['train']}, lr {t['lr']}, batch {t['batch_size']}, at most "
        f"{t['max_minutes']} min); every row is scored against the ORIGINAL dense model.",
        "",
        "| model | merge setting | cos mean | cos p5 | NN unchanged | FLOPs ratio | latency ratio | train steps |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        "| dense (original) | | 1.0000 | 1.0000 | 1.000 | 1.000 | 1.000 | |",
    ]
    for r in result["rows"]:
        who = "distilled for merging" if r["distilled"] else "original (training-free)"
        if r["distilled"] and {k: v for k, v in r["settings"].items() if k != "recover"} != r["trained_for"]:
            who += f" (trained for {_label({'settings': r['trained_for'], 'keep': 0})})"
        lines.append(f"| {who} | {_label(r)} | {r['cos_mean']:.4f} | {r['cos_p5']:.4f} | {r['nn_unchanged']:.3f} | "
                     f"{r['flops_ratio']:.3f} | {r['latency_ratio']:.3f} | {r.get('train_steps', '')} |")
    write_results(out, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
