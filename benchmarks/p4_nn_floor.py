"""How fragile is P4's nearest-neighbour metric? The NN share left unchanged by perturbations of known size.

BENCHMARK.md P4 counts the paragraphs whose nearest neighbour among the 512 is unchanged. Many of the
paragraphs have two neighbours almost equally close, so any change to the embeddings flips some of them.
This script measures, on the same 512 paragraphs as P4:
- the dense model's margin between the nearest and second-nearest neighbour (cosine);
- the NN share kept by the dense model run in bf16 (a change no user would call pruning);
- the NN share kept by random perturbations orthogonal to each embedding, at an exact cosine to dense
  (mean over 5 draws);
- the NN share kept by ToMe-style merging (hidden features) at light FLOPs budgets, down to P4's 0.6;
and for each, the share whose dense nearest neighbour stays in the changed model's top 3 (P4's metric).

    PYTHONPATH=src python benchmarks/p4_nn_floor.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from common import out_arg, write_results  # benchmarks/ is on sys.path when run as a script

import trimformer
from trimformer import tokens
from trimformer.evaluate.encoder import embed, evaluate_encoder, neighbours, paragraph_batches
from trimformer.evaluate.retrieval import neighbour_in_topk

COSINES = (0.999, 0.995, 0.99, 0.98, 0.97)
BUDGETS = (0.95, 0.9, 0.8, 0.7, 0.6)


def perturbed(e: torch.Tensor, cos: float, g: torch.Generator) -> torch.Tensor:
    """Unit embeddings rotated by a random direction orthogonal to each, to exactly `cos` with the original."""
    n = torch.randn(e.shape, generator=g, dtype=e.dtype)
    n = F.normalize(n - (n * e).sum(1, keepdim=True) * e, dim=-1)
    return e * cos + n * (1 - cos * cos) ** 0.5


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paragraphs", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--draws", type=int, default=5)
    out_arg(p, "p4_nn_floor")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = trimformer.load("minilm-l6", with_tokenizer=True)
    batches = paragraph_batches(tok, args.paragraphs, args.batch)
    dense = embed(model, batches)
    e = F.normalize(dense, dim=-1)
    nn0 = neighbours(dense)
    top = (e @ e.T).fill_diagonal_(-2.0).topk(2, dim=1).values
    margin = top[:, 0] - top[:, 1]
    rows = []
    g = torch.Generator().manual_seed(0)
    for c in COSINES:
        draws = [perturbed(e, c, g) for _ in range(args.draws)]
        kept = [(neighbours(d) == nn0).float().mean().item() for d in draws]
        top3 = [neighbour_in_topk(e, d, 3) for d in draws]
        rows.append({"change": f"random direction, cos {c}", "cos_mean": c, "nn_unchanged": sum(kept) / len(kept),
                     "nn_top3": sum(top3) / len(top3)})
    half = embed(model.to(torch.bfloat16), batches).float()
    model.float()
    rows.append({"change": "dense model in bf16", "cos_mean": F.cosine_similarity(half, dense).mean().item(),
                 "nn_unchanged": (neighbours(half) == nn0).float().mean().item(), "nn_top3": neighbour_in_topk(dense, half, 3)})
    merged = evaluate_encoder(model, batches, [("merge", {"flops": f, "features": "hidden"}) for f in BUDGETS],
                              timing_batches=1, reps=1, progress=False, prune=tokens.prune)
    for r in merged:
        rows.append({"change": f"merge, FLOPs {r['flops_ratio']:.3f}", "cos_mean": r["cos_mean"],
                     "nn_unchanged": r["nn_unchanged"], "nn_top3": r["nn_top3"], "flops_ratio": r["flops_ratio"]})
    q = [0.05, 0.1, 0.25, 0.5]
    result = {
        "benchmark": "P4 NN fragility", "model": "minilm-l6", "paragraphs": args.paragraphs,
        "margin_quantiles": dict(zip(map(str, q), margin.quantile(torch.tensor(q)).tolist())),
        "share_margin_below": {str(t): (margin < t).float().mean().item() for t in (0.005, 0.01, 0.02)},
        "rows": rows,
        "command": "PYTHONPATH=src python benchmarks/p4_nn_floor.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    out = Path(args.out)
    md = [f"# P4 nearest-neighbour fragility: minilm-l6, {args.paragraphs} paragraphs", "", f"`{result['command']}`", "",
          "Cosine margin between each paragraph's nearest and second-nearest neighbour (dense): "
          + ", ".join(f"{float(k) * 100:g}th pct {v:.4f}" for k, v in result["margin_quantiles"].items()) + "; share with "
          "margin below " + ", ".join(f"{k}: {v:.3f}" for k, v in result["share_margin_below"].items()) + ".", "",
          "| change | cos mean to dense | NN unchanged | dense NN in top 3 |", "| --- | ---: | ---: | ---: |"]
    md += [f"| {r['change']} | {r['cos_mean']:.4f} | {r['nn_unchanged']:.3f} | {r['nn_top3']:.3f} |" for r in rows]
    write_results(out, result, "\n".join(md) + "\n", indent=1)
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
