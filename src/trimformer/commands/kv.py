"""KV-cache subcommands: `generate` with a press, and `bench-kv` (BENCHMARK.md P3)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import parse_pairs


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with a compressed KV cache (a press)")
    p.add_argument("--model", required=True, help="bundled name (smollm2-135m), HF directory, .gguf file or hub id")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="a file holding the prompt")
    p.add_argument("--press", default="snapkv", help="press name, 'token+channel' (snapkv+think), or perhead-NAME")
    p.add_argument("--ratio", type=float, default=0.5, help="share of the prompt's KV cache removed, in [0, 1)")
    p.add_argument("--decode-budget", type=int, default=None, help="most tokens each head holds while decoding")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a press setting, e.g. window=32")
    p.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench-kv", help="P3 benchmark: presses vs full cache (and kvpress) on smollm2-135m")
    b.add_argument("--model", default="smollm2-135m", help="only smollm2-135m (the P3 protocol's model)")
    b.add_argument("--presses", default=None, help="comma-separated trimformer presses")
    b.add_argument("--ratios", default="0.25,0.5,0.75")
    b.add_argument("--contexts", type=int, default=8)
    b.add_argument("--needles", type=int, default=9)
    b.add_argument("--no-peer", action="store_true", help="skip kvpress")
    b.add_argument("--out", default="benchmarks/results/p3_kv")
    b.set_defaults(func=cmd_bench)




def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .. import kv, load

    text = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    name = args.press
    settings = parse_pairs(args.set)
    if name.startswith("perhead-"):
        press = kv.PerHead(kv.build_press(name.removeprefix("perhead-"), args.ratio, **settings), ratio=args.ratio)
    else:
        press = kv.build_press(name, args.ratio, **settings)  # bad names / ratios fail before loading
    model, tok = load(args.model, with_tokenizer=True)
    inputs = tok(text, return_tensors="pt")
    with torch.no_grad(), kv.press(model, press, decode_budget=args.decode_budget) as session:
        cache = session.new_cache()
        t = time.perf_counter()
        out = model.generate(**inputs, cache=cache, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        dt = time.perf_counter() - t
    new = out[0, inputs["input_ids"].shape[1]:]
    print(tok.decode(new, skip_special_tokens=True))
    L = len(cache.layers)
    print(f"[{name} ratio {args.ratio}: prompt {inputs['input_ids'].shape[1]} tokens, {new.numel()} generated in "
          f"{dt:.1f} s; KV held {cache.nbytes / 2**20:.2f} MiB over {L} layers, "
          f"{cache.kept_tokens().float().mean():.0f} tokens per head]", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.model != "smollm2-135m":
        raise ValueError("bench-kv runs the P3 protocol, defined on smollm2-135m; use --model smollm2-135m")
    root = Path(__file__).resolve().parents[3] / "benchmarks" / "p3_kv.py"
    if not root.is_file():
        raise FileNotFoundError(f"bench-kv needs the repository's benchmarks/p3_kv.py (not found at {root})")
    import importlib.util

    spec = importlib.util.spec_from_file_location("p3_kv", root)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["--ratios", args.ratios, "--contexts", str(args.contexts), "--needles", str(args.needles),
            "--out", args.out]
    if args.presses:
        argv += ["--presses", args.presses]
    if args.no_peer:
        argv.append("--no-peer")
    return mod.main(argv)
