"""Token pruning subcommands: bench-tokens (BENCHMARK.md P4 on an encoder)."""

from __future__ import annotations

import argparse
import json


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


def cmd_bench_tokens(args: argparse.Namespace) -> int:
    from .. import anatomy_of, load
    from ..tokens import TOKENS
    from ..tokens.bench import evaluate_encoder, paragraph_batches

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    for n in names:
        TOKENS.get(n)  # unknown names fail before the model loads
    field, values = ("flops", args.flops) if args.flops is not None else ("keep", args.keep)
    try:
        keeps = [float(k) for k in values.split(",")]
    except ValueError:
        raise ValueError(f"--{field} {values!r}: expected comma-separated numbers like 0.8,0.6,0.4") from None
    extra = {}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        k, v = item.split("=", 1)
        extra[k.strip()] = v.strip()
    model, tok = load(args.model, with_tokenizer=True)
    if anatomy_of(model).causal:
        raise ValueError(f"{args.model} is a decoder; bench-tokens measures encoders. "
                         "For LLM prefill pruning run benchmarks/lazyllm.py")
    batches = paragraph_batches(tok, args.paragraphs, args.batch)
    methods = [(n, {field: k, **extra}) for n in names for k in keeps]
    rows = evaluate_encoder(model, batches, methods, args.timing_batches, args.reps)
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
