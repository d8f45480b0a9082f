"""LazyLLM generation on smollm2-135m with and without revival of pruned prompt tokens, dense side by side.

Prompts as benchmarks/lazyllm.py (consecutive 1,536-token windows of the doc corpus' evaluation pool).
Each prompt is continued greedily for `--new` tokens by the dense model, by lazy prefill pruning whose
pruned tokens stay out (revive=False), and by lazy with revival (revive=True: at every step each layer
computes the top-attended prompt tokens it lacks from their saved states). Reported: share of generated
positions equal to dense, mean length of the prefix equal to dense, tokens revived as a share of the
(token, layer) pairs prefill skipped, and the generate wall-time ratio (median of alternating runs).

    PYTHONPATH=src python benchmarks/lazyllm_revive.py                    # the reported run
    PYTHONPATH=src python benchmarks/lazyllm_revive.py --prompts 2 --new 4 --reps 1   # quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import out_arg, threads_arg, write_results  # benchmarks/ is on sys.path when run as a script

import trimformer
from trimformer import tokens
from trimformer.data import doc_pools, windows


@torch.no_grad()
def generate(model, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids[None], max_new_tokens=new, do_sample=False, min_new_tokens=new)
    return out[0, ids.shape[0]:], time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--length", type=int, default=1536)
    p.add_argument("--new", type=int, default=16, help="tokens generated per prompt")
    p.add_argument("--start", type=int, default=4)
    p.add_argument("--keep", type=float, default=0.15)
    p.add_argument("--reps", type=int, default=2, help="alternating timing runs on the first prompt")
    threads_arg(p, default=1)
    out_arg(p, "lazyllm_revive")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = trimformer.load("smollm2-135m", with_tokenizer=True)
    model.generation_config.pad_token_id = tok.eos_token_id
    prompts = windows(doc_pools(tok)[1], args.prompts, args.length, what="the doc corpus' evaluation pool")
    dense = [generate(model, ids, args.new)[0] for ids in prompts]
    L = len(trimformer.anatomy_of(model).blocks)

    rows = [{"variant": "dense", "agree": 1.0, "prefix": float(args.new), "revived_share": None, "time_ratio": 1.0}]
    for revive in (False, True):
        method = tokens.build("lazy", {"start": args.start, "keep": args.keep, "revive": revive})
        agree, prefix, revived, skipped = [], [], 0, 0
        for ids, ref in zip(prompts, dense):
            with tokens.prune(model, method) as s:
                out, _ = generate(model, ids, args.new)
                counts = s.counts
                revived += sum(s.aux.revived.values()) if s.aux is not None else 0
            skipped += sum(counts[0][0] - c[0] for c in counts)
            same = (out == ref).tolist()
            agree.append(sum(same) / len(same))
            prefix.append(next((j for j, ok in enumerate(same) if not ok), len(same)))
        ratios = []
        for _ in range(args.reps):  # alternate: the machine's load changes from second to second
            td = generate(model, prompts[0], args.new)[1]
            with tokens.prune(model, method):
                ratios.append(generate(model, prompts[0], args.new)[1] / td)
        row = {"variant": f"lazy start {args.start} keep {args.keep}" + (" + revive" if revive else ""),
               "agree": statistics.mean(agree), "prefix": statistics.mean(prefix),
               "revived_share": revived / skipped if skipped else 0.0, "time_ratio": statistics.median(ratios)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "benchmark": "lazyllm_revive", "model": "smollm2-135m", "blocks": L, "prompts": args.prompts,
        "length": args.length, "new": args.new, "reps": args.reps, "threads": args.threads, "rows": rows,
        "command": "PYTHONPATH=src python benchmarks/lazyllm_revive.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    out = Path(args.out)
    lines = [
        f"# LazyLLM generation with / without revival: {result['model']}, {args.prompts} prompts x {args.length} "
        f"tokens, {args.new} new tokens (greedy)",
        "",
        f"`{result['command'].strip()}`; {args.threads} threads; time ratio = generate wall time pruned / dense, "
        f"median of {args.reps} alternating runs on one prompt.",
        "",
        "| variant | generated tokens equal to dense | mean equal prefix | revived / skipped (token, layer) | time ratio |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        rs = "" if r["revived_share"] is None else f"{r['revived_share']:.3f}"
        lines.append(f"| {r['variant']} | {r['agree']:.3f} | {r['prefix']:.2f} | {rs} | {r['time_ratio']:.3f} |")
    write_results(out, result, "\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
