"""Weight-area subcommands: export a pruned checkpoint in a sparse format."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="re-save a (pruned) model: dense safetensors or compressed-tensors sparse formats")
    p.add_argument("model", help="model directory (e.g. the output of `trimformer prune`), or a bundled name")
    p.add_argument("--format", choices=["compressed-tensors", "sparse-bitmask", "sparse-24-bitmask", "dense"],
                   default="compressed-tensors",
                   help="compressed-tensors: 2:4 layout when every projection is 2:4, else bitmask (default)")
    p.add_argument("--out", help="output folder (default: MODEL-<format>); written atomically")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from .. import load
    from ..export.compressed import save_compressed
    from ..export.hf import save_pretrained

    out = Path(args.out or f"{str(args.model).rstrip('/')}-{args.format}")
    model, tok = load(args.model, with_tokenizer=True)
    if args.format == "dense":
        save_pretrained(model, out, tokenizer=tok, overwrite=args.overwrite)
    else:
        fmt = "auto" if args.format == "compressed-tensors" else args.format
        save_compressed(model, out, fmt=fmt, tokenizer=tok, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({args.format}, {size / 2**20:.1f} MB of tensors)")
    return 0
