"""Structure subcommands: sensitivity (per-block / per-sublayer importance, with a plot)."""

from __future__ import annotations

import argparse
import json

from . import MODEL_HELP


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sensitivity", help="per-block and per-sublayer importance of a model, with a plot")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--data", default="docs", help="calibration text: 'docs', 'natural', 'mix', a file, a folder or a JSONL file")
    p.add_argument("--windows", type=int, default=2, help="calibration windows")
    p.add_argument("--length", type=int, default=128, help="tokens per window")
    p.add_argument("--plot", default=None, help="write the plot to this .png")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_sensitivity)


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from .. import data, load
    from ..structure.sensitivity import plot, sensitivity

    model, tok = load(args.model, with_tokenizer=True)
    calib = data.calibration_windows(tok, source=args.data, n=args.windows, length=args.length)
    res = sensitivity(model, calib, windows=args.windows, length=args.length)
    if args.plot:
        plot(res, args.plot, title=f"{args.model}: sensitivity")
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{'block':>5} {'influence':>10} {'KL attn off':>12} {'KL mlp off':>11}")
    for i, bi in enumerate(res["block_influence"]):
        a = res["attn_kl"][i] if res["attn_kl"] else None
        m = res["mlp_kl"][i] if res["mlp_kl"] else None
        print(f"{i:>5} {bi:>10.4f} {a if a is None else f'{a:.4f}':>12} {m if m is None else f'{m:.4f}':>11}")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0
