"""Token pruning subcommands: bench-tokens (BENCHMARK.md P4 on an encoder), distill-tokens (fine-tune for merging)."""

from __future__ import annotations

import argparse
import json

from . import check_out, parse_pairs


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-tokens", help="token pruning / merging on an encoder: embedding fidelity, FLOPs, latency")
    p.add_argument("--model", default="minilm-l6", help="an encoder: bundled name, HF directory or hub id")
    p.add_argument("--methods", default="zero-tprune,merge,acc",
                   help="comma-separated token methods: zero-tprune, merge, transform, acc")
    p.add_argument("--keep", default="0.8,0.6,0.4", help="comma-separated shares of tokens reaching the last block")
    p.add_argument("--flops", default=None,
                   help="comma-separated shares of dense block FLOPs (e.g. 0.6); solves keep, replaces --keep")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a method setting, e.g. start=2")
    p.add_argument("--paragraphs", type=int, default=128, help="doc-corpus paragraphs (P4 uses 512)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--timing-batches", type=int, default=2, help="batches timed, alternating dense and pruned")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p.set_defaults(func=cmd_bench_tokens)

    d = sub.add_parser("distill-tokens", help="fine-tune an encoder with token merging on, towards its own dense "
                                              "embeddings (merge-aware distillation); saves the model")
    d.add_argument("--model", default="minilm-l6", help="an encoder: bundled name, HF directory or hub id")
    d.add_argument("--method", default="merge", help="the token method used during training and after")
    d.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a method setting, e.g. threshold=0.47 (default: keep=0.02 threshold=0.47 features=hidden)")
    d.add_argument("--train-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a DistillConfig setting, e.g. lr=3e-5, loss=cos+sim+rank, train=norms, max_minutes=15")
    d.add_argument("--docstrings", action="store_true", help="also train on standard-library docstrings")
    d.add_argument("--out", required=True, help="folder for the fine-tuned model (HF format)")
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(func=cmd_distill_tokens)


def cmd_bench_tokens(args: argparse.Namespace) -> int:
    from .. import anatomy_of, load
    from ..evaluate.encoder import evaluate_encoder, paragraph_batches
    from ..tokens import build, prune

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    field, values = ("flops", args.flops) if args.flops is not None else ("keep", args.keep)
    try:
        keeps = [float(k) for k in values.split(",")]
    except ValueError:
        raise ValueError(f"--{field} {values!r}: expected comma-separated numbers like 0.8,0.6,0.4") from None
    extra = parse_pairs(args.set)
    methods = [(n, {field: k, **extra}) for n in names for k in keeps]
    for n, settings in methods:
        build(n, settings)  # unknown names and bad values fail before the model loads
    model, tok = load(args.model, with_tokenizer=True)
    if anatomy_of(model).causal:
        raise ValueError(f"{args.model} is a decoder; bench-tokens measures encoders. "
                         "For LLM prefill pruning run benchmarks/lazyllm.py")
    batches = paragraph_batches(tok, args.paragraphs, args.batch)
    rows = evaluate_encoder(model, batches, methods, args.timing_batches, args.reps, prune=prune)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{args.model}: {args.paragraphs} paragraphs, batch {args.batch}; ratios are pruned / dense")
    print(f"{'method':<12} {field:>5} {'cos mean':>9} {'cos p5':>7} {'NN kept':>8} {'FLOPs':>6} {'latency':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<12} {r['settings'][field]:>5} {r['error']}")
            continue
        print(f"{r['method']:<12} {r['settings'][field]:>5} {r['cos_mean']:>9.4f} {r['cos_p5']:>7.4f} "
              f"{r['nn_unchanged']:>8.3f} {r['flops_ratio']:>6.3f} {r['latency_ratio']:>8.3f}")
    return 0


def cmd_distill_tokens(args: argparse.Namespace) -> int:
    from .. import anatomy_of, load
    from ..data import training_paragraphs
    from ..export.hf import save_pretrained
    from ..recover import DistillConfig, distill_merge_
    from ..registry import coerce_fields
    from ..tokens import build

    settings = parse_pairs(args.set) or {"keep": "0.02", "threshold": "0.47", "features": "hidden"}
    method = build(args.method, settings)  # bad names / values fail before the model loads
    cfg = DistillConfig(**coerce_fields(DistillConfig, parse_pairs(args.train_set, "--train-set")))
    check_out(args.out, args.overwrite, args.model)
    model, tok = load(args.model, with_tokenizer=True)
    if anatomy_of(model).causal:
        raise ValueError(f"{args.model} is a decoder; distill-tokens fine-tunes encoders for token merging")
    data = training_paragraphs(tok, docstrings=args.docstrings)
    distill_merge_(model, method, data, cfg)
    summary = model.trimformer_history[-1]
    out = save_pretrained(model, args.out, tokenizer=tok, overwrite=args.overwrite,
                          extra_files={"trimformer_distill.json": summary})
    L = summary["result"]["losses"]
    print(f"{len(L)} steps, loss {sum(L[:20]) / len(L[:20]):.4f} -> {sum(L[-50:]) / len(L[-50:]):.4f}; saved to {out}")
    return 0
