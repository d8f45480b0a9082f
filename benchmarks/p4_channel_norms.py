"""How much of a hidden-channel cut is the norms' statistics (structure/channels.py's approximation), on dinov2-s.

The n least important channels (width's Fisher mask gradient, 32 calibration views) are cut two ways: masked (zero
in everything that writes the stream, so every LayerNorm still averages over 384 channels with zeros) and removed
(channels.prune_channels: the norms average over 384 - n). The difference between the two is the approximation
alone; each is also compared with the dense features on the kept channels. Quality only, no lock needed:

    PYTHONPATH=src python benchmarks/p4_channel_norms.py --drop 24 48 96
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.nn.functional as F
from common import out_arg, threads_arg, write_results  # benchmarks/ is on sys.path when run as a script

import trimformer
from trimformer.data.images import ViewConfig, retrieval_views
from trimformer.models import anatomy_of
from trimformer.structure import channels


@torch.no_grad()
def masked(model, drop: torch.Tensor):
    """A copy in which channels `drop` are zero in the residual stream (nothing writes them)."""
    m = copy.deepcopy(model)
    an = anatomy_of(m)
    an.embed.weight[drop] = 0
    an.embed.bias[drop] = 0
    for t in (m.embeddings.cls_token, m.embeddings.position_embeddings):
        t[..., drop] = 0
    for b in an.blocks:
        for p in (b.attention.o, b.mlp.down):
            p.weight[drop] = 0
            p.bias[drop] = 0
    return m


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine of the [CLS] features."""
    return F.cosine_similarity(a[:, 0], b[:, 0], dim=-1).mean().item()


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--drop", type=int, nargs="+", default=[24, 48, 96], help="channels removed (of 384)")
    p.add_argument("--images", type=int, default=32)
    threads_arg(p, default=1)
    out_arg(p, "p4_channel_norms")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = trimformer.load("dinov2-s")
    calib, _ = retrieval_views(ViewConfig(views=2, seed=1))
    px, _ = retrieval_views(ViewConfig(views=2, seed=0))
    calib, px = calib[: args.images], px[: args.images]
    scores = channels.channel_scores(anatomy_of(model), calib, 8, "fisher")
    dense = model(pixel_values=px).last_hidden_state  # (n, T, 384)
    rows = []
    for n in args.drop:
        drop = scores.topk(n, largest=False).indices
        keep = torch.tensor(sorted(set(range(dense.shape[-1])) - set(drop.tolist())))
        zeroed = masked(model, drop)(pixel_values=px).last_hidden_state[..., keep]
        cut = copy.deepcopy(model)
        channels.prune_channels(anatomy_of(cut), keep)
        removed = cut(pixel_values=px).last_hidden_state
        rows.append({"drop": n, "cos_masked_removed": cos(zeroed, removed), "cos_masked_dense": cos(zeroed, dense[..., keep]),
                     "cos_removed_dense": cos(removed, dense[..., keep]),
                     "max_abs_masked_removed": (zeroed - removed).abs().max().item()})
        print(json.dumps(rows[-1]), flush=True)
    lines = ["# Hidden-channel cut on dinov2-s: the norms' statistics", "",
             f"`PYTHONPATH=src python benchmarks/p4_channel_norms.py --drop {' '.join(map(str, args.drop))}`; "
             f"{args.images} views, [CLS] cosine. masked: the channels zero in the stream, norms over 384; removed: "
             "physically cut, norms over the rest.", "",
             "| channels cut | cos(masked, removed) | cos(masked, dense) | cos(removed, dense) | max abs(masked - removed) |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['drop']} | {r['cos_masked_removed']:.4f} | {r['cos_masked_dense']:.4f} | {r['cos_removed_dense']:.4f} | "
              f"{r['max_abs_masked_removed']:.3g} |" for r in rows]
    result = {"benchmark": "P4-vision channel norms", "model": "dinov2-s", "rows": rows, "images": args.images}
    write_results(args.out, result, "\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
