"""LazyLLM prefill pruning on smollm2-135m: time-to-first-token vs first-token agreement and next-token KL.

Prompts: consecutive 1,536-token windows from the start of the doc corpus' evaluation pool (BENCHMARK.md
P1 pools). For each setting: prefill FLOPs ratio (blocks, counted from the tokens each block really
computed), time-to-first-token ratio (median of alternating dense / pruned runs in one process), share
of prompts whose greedy first token equals dense, and mean KL(dense || pruned) of that distribution.

    PYTHONPATH=src python benchmarks/lazyllm.py --prompts 8 --reps 2   # the reported run
    PYTHONPATH=src python benchmarks/lazyllm.py --prompts 2 --reps 1   # quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import out_arg, threads_arg, write_results

import trimformer
from trimformer import tokens
from trimformer.data import doc_pools, windows
from trimformer.evaluate import compare

SETTINGS = [  # (start, keep): the share of the prompt reaching the last block
    (4, 0.3),
    (4, 0.15),
    (6, 0.1),
    (8, 0.05),
]


@torch.no_grad()
def first_token(model, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Log-probs of the first generated token (V,) and the prefill wall time (time-to-first-token): a timed
    prefill with the cache on and only the last position's logits, which evaluate's scoring forward is not."""
    t0 = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    logp = F.log_softmax(out.logits[0, -1].float(), -1)
    logp.argmax().item()
    return logp, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--length", type=int, default=1536)
    p.add_argument("--reps", type=int, default=3, help="alternating timing runs per timed prompt and setting")
    p.add_argument("--timing-prompts", type=int, default=1, help="prompts timed (the CPU here is slow and shared)")
    threads_arg(p, default=1)
    p.add_argument("--settings", default=None, help="override, e.g. '4:0.3,8:0.1' (start:keep)")
    out_arg(p, "lazyllm")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = SETTINGS if args.settings is None else [
        (int(s.split(":")[0]), float(s.split(":")[1])) for s in args.settings.split(",")]

    model, tok = trimformer.load("smollm2-135m", with_tokenizer=True)
    prompts = windows(doc_pools(tok)[1], args.prompts, args.length, what="the doc corpus' evaluation pool")
    first_token(model, prompts[0, :64][None])  # warm-up
    dense = [first_token(model, ids[None])[0] for ids in prompts]

    rows = []
    for start, keep in settings:
        agree, kl, flops, t_dense, t_pruned = [], [], [], [], []
        method = tokens.build("lazy", {"start": start, "keep": keep})
        for j, (ids, ref) in enumerate(zip(prompts, dense)):
            with tokens.prune(model, method) as s:
                logp, _ = first_token(model, ids[None])
                flops.append(s.flops())
            k, a = compare(logp[None], ref[None])  # one position: KL(dense || pruned), argmax agreement
            agree.append(a)
            kl.append(k)
            for _ in range(args.reps if j < args.timing_prompts else 0):  # alternate: the machine's load changes from second to second
                t_dense.append(first_token(model, ids[None])[1])
                with tokens.prune(model, method):
                    t_pruned.append(first_token(model, ids[None])[1])
        ratio = [tp / td for tp, td in zip(t_pruned, t_dense)]
        row = {
            "start": start,
            "keep": keep,
            "prefill_flops_ratio": sum(f["pruned"] for f in flops) / sum(f["dense"] for f in flops),
            "ttft_ratio": statistics.median(ratio),
            "ttft_dense_s": statistics.median(t_dense),
            "ttft_pruned_s": statistics.median(t_pruned),
            "first_token_agree": sum(agree) / len(agree),
            "kl_first_token": sum(kl) / len(kl),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    result = {
        "benchmark": "lazyllm", "model": "smollm2-135m", "prompts": args.prompts, "length": args.length,
        "threads": args.threads, "reps": args.reps, "timing_prompts": args.timing_prompts, "rows": rows,
        "command": "PYTHONPATH=src python benchmarks/lazyllm.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    write(result, Path(args.out))
    return result


def write(result: dict, out: Path) -> None:
    lines = [
        f"# LazyLLM prefill pruning: {result['model']}, {result['prompts']} prompts x {result['length']} tokens",
        "",
        f"`{result['command'].strip()}`; {result['threads']} threads; ratios are medians of alternating runs.",
        "",
        "| start | keep (last block) | prefill FLOPs ratio | TTFT ratio | TTFT dense (s) | first-token agree | KL first token |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        "| dense | 1.0 | 1.000 | 1.000 | | 1.000 | 0 |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['start']} | {r['keep']} | {r['prefill_flops_ratio']:.3f} | {r['ttft_ratio']:.3f} | "
                     f"{r['ttft_dense_s']:.2f} | {r['first_token_agree']:.3f} | {r['kl_first_token']:.4f} |")
    write_results(out, result, "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        rows = result["rows"]
        ax.scatter([r["ttft_ratio"] for r in rows], [r["first_token_agree"] for r in rows], label="TTFT ratio (measured)")
        ax.scatter([r["prefill_flops_ratio"] for r in rows], [r["first_token_agree"] for r in rows], marker="x",
                   label="prefill FLOPs ratio")
        for r in rows:
            ax.annotate(f"s{r['start']} k{r['keep']}", (r["ttft_ratio"], r["first_token_agree"]), fontsize=7)
        ax.scatter([1.0], [1.0], marker="*", s=80, label="dense")
        ax.set_xlabel("pruned / dense")
        ax.set_ylabel("first-token agreement with dense")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
