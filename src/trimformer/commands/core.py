"""Core subcommands: info, prune, eval."""

from __future__ import annotations

import argparse
import json


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a model's anatomy: blocks, heads / KV heads, FFN, parameters per part")
    p.add_argument("model", help="bundled name (smollm2-135m, minilm-l6), HF directory, .gguf file or hub id")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from .. import anatomy_of, load

    s = anatomy_of(load(args.model)).summary()
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{args.model}: {s['family']} ({s['model_type']}), {'decoder' if s['causal'] else 'encoder'}, "
          f"{s['num_blocks']} blocks, hidden {s['hidden_size']}, vocab {s['vocab_size']}, "
          f"{'pre' if s['pre_norm'] else 'post'}-norm, tied embeddings: {s['tied_embeddings']}")
    print(f"parameters: {s['params_total']:,} total = embed {s['params_embed']:,} + blocks {s['params_blocks']:,}"
          f" + head {s['params_head']:,} (+ norms/positions)")
    print(f"{'block':>5} {'heads':>5} {'kv':>3} {'hdim':>4} {'ffn':>6} {'attn params':>12} {'mlp params':>11}")
    for b in s["blocks"]:
        print(f"{b['index']:>5} {b['heads']:>5} {b['kv_heads']:>3} {b['head_dim']:>4} {b['ffn']:>6} "
              f"{b['attention_params']:>12,} {b['mlp_params']:>11,}")
    return 0
