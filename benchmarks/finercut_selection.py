"""How FinerCut's settings were chosen without touching the evaluation pool: each configuration cuts
20 % of the blocks' matmul compute from smollm2-135m, and the cut is scored on a held-out split of the
CALIBRATION pool (by default its last 8 windows of 512 tokens, never among the 64 calibration windows
the methods see; `--held 64:96` for a larger split): KL to the dense model and perplexity there, beside
block influence removing 6 whole blocks.

    PYTHONPATH=src python benchmarks/finercut_selection.py '{"compute": 0.2, "rank": "kl", "blocks": false, "refine": 3}'
    PYTHONPATH=src python benchmarks/finercut_selection.py '{"compute": 0.2, "windows": 16}' --held 64:96
    PYTHONPATH=src python benchmarks/finercut_selection.py --block-influence --held 64:96

Each run appends one JSON line to benchmarks/results/finercut_selection.jsonl. A FinerCut run reports
the greedy's set and the set after swap refinement, each scored on the held-out windows.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import time
from pathlib import Path

import torch

import trimformer
from trimformer import data
from trimformer.evaluate import Reference
from trimformer.models import anatomy_of
from trimformer.steps import StepContext
from trimformer.structure.finercut import FinerCut
from trimformer.structure.probe import silenced

OUT = Path(__file__).parent / "results" / "finercut_selection.jsonl"


def heldout(dense, an, ref: Reference, removed) -> dict[str, float]:
    """KL(dense || cut) and perplexity on the held-out windows, the cut made by silencing sublayers."""
    with contextlib.ExitStack() as st:
        for i, k in removed:
            st.enter_context(silenced(an.blocks[i], k))
        s = ref.score(dense)
    return {"kl": s["kl"], "ppl": s["ppl"]}


def flops_removed(an, removed, context: int = 512) -> float:
    """Share of the dense per-token FLOPs (p1p2_structure.flops_per_token's formula) the cut removes."""
    b = an.blocks[0]
    attn = 2 * sum(p.weight.numel() for p in b.attention.projections.values()) + \
        4 * b.attention.num_heads * b.attention.head_dim * context / 2
    mlp = 2 * sum(p.weight.numel() for p in b.mlp.projections.values())
    total = len(an.blocks) * (attn + mlp) + 2 * an.head.weight.numel()
    return sum(attn if k == "attn" else mlp for _, k in removed) / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default="{}", help="FinerCut settings as JSON (compute defaults to 0.2)")
    p.add_argument("--block-influence", action="store_true", help="score block influence removing 6 blocks instead")
    p.add_argument("--held", default="102:110", help="held-out windows START:END of the calibration pool's 512-token "
                   "windows (110 of them; the 64 calibration windows are 0:64)")
    a = p.parse_args()
    torch.set_num_threads(1)
    dense, tok = trimformer.load("smollm2-135m", with_tokenizer=True)
    an = anatomy_of(dense)
    pool = data.doc_pools(tok)[0]
    lo, hi = (int(v) for v in a.held.split(":"))
    if lo < 64:
        raise SystemExit(f"--held {a.held} overlaps the 64 calibration windows (0:64)")
    held = data.windows(pool, pool.numel() // 512, 512)[lo:hi]  # (n, 512), never calibration windows
    ref = Reference(dense, held)
    calib = data.calibration_windows(tok, n=64, length=512)
    if a.block_influence:
        m = copy.deepcopy(dense)
        res = trimformer.prune_(m, trimformer.build("depth", {"remove": 6}), calibration=calib,
                                progress=False).trimformer_history[-1]["result"]
        cut = [(i, k) for i in res["removed_blocks"] for k in ("attn", "mlp")]
        out = {"method": "block-influence remove=6", "removed": res["removed_blocks"],
               "held": heldout(dense, an, ref, cut), "flops_removed": flops_removed(an, cut)}
    else:
        cfg = {"compute": 0.2, **json.loads(a.config)}
        m = copy.deepcopy(dense)
        t = time.time()
        res = FinerCut(**cfg).apply_(anatomy_of(m), StepContext(calibration=calib))
        greedy = [(r["block"], r["sublayer"]) for r in res["removed"]]
        final = [tuple(u) for u in res["final"]]
        out = {"method": "finercut", "cfg": cfg, "seconds": time.time() - t, "greedy_kl": res["greedy_kl"],
               "kl": res["kl"], "swaps": res["swaps"], "greedy": greedy, "final": final,
               "compute_removed": res["compute_removed"],
               "held_greedy": heldout(dense, an, ref, greedy), "held_final": heldout(dense, an, ref, final),
               "flops_greedy": flops_removed(an, greedy), "flops_final": flops_removed(an, final)}
    out["held_windows"] = a.held
    print(json.dumps(out), flush=True)
    with OUT.open("a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
