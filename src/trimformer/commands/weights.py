"""Weight-area subcommands: export a pruned checkpoint in a sparse format; analyze its sparsity."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import check_out


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="re-save a (pruned) model: dense safetensors or compressed-tensors sparse formats")
    p.add_argument("model", help="model directory (e.g. the output of `trimformer prune`), or a bundled name")
    p.add_argument("--format", choices=["compressed-tensors", "sparse-bitmask", "sparse-24-bitmask", "dense"],
                   default="compressed-tensors",
                   help="compressed-tensors: 2:4 layout when every projection is 2:4, else bitmask (default)")
    p.add_argument("--out", help="output folder (default: MODEL-<format>); written atomically")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("analyze", help="per-layer sparsity and PQ Index (Diao et al.) of a model's projections")
    p.add_argument("model", help="model directory, .gguf file or bundled name")
    p.add_argument("--pq-p", dest="pq_p", type=float, default=0.5, help="PQ Index p (0 < p < q; default 0.5)")
    p.add_argument("--pq-q", dest="pq_q", type=float, default=1.0, help="PQ Index q (default 1.0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_analyze)


def cmd_export(args: argparse.Namespace) -> int:
    from .. import load
    from ..export.compressed import save_compressed
    from ..export.hf import save_pretrained

    out = Path(args.out or f"{str(args.model).rstrip('/')}-{args.format}")
    check_out(out, args.overwrite, args.model)
    model, tok = load(args.model, with_tokenizer=True)
    if args.format == "dense":
        save_pretrained(model, out, tokenizer=tok, overwrite=args.overwrite)
    else:
        fmt = "auto" if args.format == "compressed-tensors" else args.format
        save_compressed(model, out, fmt=fmt, tokenizer=tok, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({args.format}, {size / 2**20:.1f} MB of tensors)")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .. import load
    from ..weights.metrics import analyze

    if not 0 < args.pq_p < args.pq_q:
        raise ValueError(f"PQ Index needs 0 < p < q, got --pq-p {args.pq_p} --pq-q {args.pq_q}")
    r = analyze(load(args.model), args.pq_p, args.pq_q)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{'layer':<48} {'params':>10} {'sparsity':>8} {'PQ':>7}")
    for row in r["layers"]:
        print(f"{row['layer']:<48} {row['params']:>10,} {row['sparsity']:>8.3f} {row['pq_index']:>7.4f}")
    m = r["model"]
    print(f"{'model (all projections)':<48} {m['params']:>10,} {m['sparsity']:>8.3f} {m['pq_index']:>7.4f}")
    return 0
