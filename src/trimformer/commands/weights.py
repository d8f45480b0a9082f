"""Weight-area subcommands: export a pruned checkpoint (sparse formats, or the serving engines' DeciLM / GGUF);
analyze its sparsity."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import check_out


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="re-save a (pruned) model: compressed-tensors sparse formats, dense "
                       "safetensors, or for serving engines: deci (vLLM) and gguf (llama.cpp)")
    p.add_argument("model", help="model directory (e.g. the output of `trimformer prune`), or a bundled name")
    p.add_argument("--format", choices=["compressed-tensors", "sparse-bitmask", "sparse-24-bitmask", "dense", "deci",
                                        "gguf"], default="compressed-tensors",
                   help="compressed-tensors: 2:4 layout when every projection is 2:4, else bitmask (default); "
                   "deci: DeciLM / Nemotron-NAS block_configs that stock vLLM loads (query heads global); "
                   "gguf: one llama.cpp file (the family's architecture when uniform, else `deci`)")
    p.add_argument("--out", help="output folder, or .gguf file (default: MODEL-<format>, MODEL-<type>.gguf); "
                   "written atomically")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_engine_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("analyze", help="per-layer sparsity and PQ Index (Diao et al.) of a model's projections")
    p.add_argument("model", help="model directory, .gguf file or bundled name")
    p.add_argument("--pq-p", dest="pq_p", type=float, default=0.5, help="PQ Index p (0 < p < q; default 0.5)")
    p.add_argument("--pq-q", dest="pq_q", type=float, default=1.0, help="PQ Index q (default 1.0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_analyze)


def add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("serving formats (deci, gguf)")
    g.add_argument("--gguf-type", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_k_m"],
                   help="GGUF tensor type (default f16); q4_k_m is made by llama.cpp's quantizer (needs llama-cpp-python)")
    g.add_argument("--gguf-pre", help="llama.cpp pre-tokenizer name, when trimformer cannot tell it from tokenizer.json")
    g.add_argument("--allow-zeros", action="store_true",
                   help="write weight-pruned (sparse) projections as dense matrices anyway (no speed in the engines)")


def engine_format(args: argparse.Namespace):
    """The serving format --format names (export.engines.EngineFormat), or None for the others."""
    from ..export.engines import EngineFormat

    if args.format not in ("deci", "gguf"):
        return None
    return EngineFormat(args.format, gguf_type=args.gguf_type, gguf_pre=args.gguf_pre, allow_zeros=args.allow_zeros)


def cmd_export(args: argparse.Namespace) -> int:
    from .. import load
    from ..export.compressed import save_compressed
    from ..export.hf import save_pretrained

    engine = engine_format(args)
    out = Path(args.out or (engine.default_out(args.model) if engine else f"{str(args.model).rstrip('/')}-{args.format}"))
    check_out(out, args.overwrite, args.model)
    if engine is not None:
        engine.check()
    model, tok = load(args.model, with_tokenizer=True)
    if engine is not None:
        engine.save(model, tok, out, overwrite=args.overwrite)
        size = (out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.glob("*.safetensors")))
        print(f"wrote {out} ({args.format}{'-' + args.gguf_type if args.format == 'gguf' else ''}, "
              f"{size / 2**20:.1f} MB)")
        return 0
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
