"""Equivalence check of the structured methods across a refactor (P1's quality measures, small settings).

Runs width, depth, FinerCut and search on smollm2-135m with small deterministic settings and records, per
run, what it chose, the parameter count, a SHA-256 of the resulting weights, and KL / top-1 / ppl against
the dense model on a few evaluation windows. Run it at two commits and compare:

    PYTHONPATH=src python benchmarks/structure_equivalence.py --out before.json
    PYTHONPATH=src python benchmarks/structure_equivalence.py --out after.json
    python benchmarks/structure_equivalence.py --compare before.json after.json

Identical hashes mean bit-identical weights; otherwise the figures are compared with a tolerance.
Speed is not measured (the machine is shared).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time

import torch

CASES: list[tuple[str, dict]] = [
    ("width", {"target": "params=0.8"}),
    ("width", {"target": "params=0.8", "parts": "ffn,heads", "sequential": True, "asymmetric": True}),
    ("width", {"target": "flops=0.85", "allocation": "global", "importance": "activation", "multiple_of": 8}),
    ("width", {"target": "params=0.9", "importance": "taylor"}),
    ("width", {"target": "params=0.85", "allocation": "measured", "shares": "0.75,0.5", "probe_windows": 4,
               "probe_length": 128, "probe_positions": 32}),
    ("depth", {"remove": 6, "fuse": True, "fuse_windows": 8}),
    ("depth", {"share": 0.15, "criterion": "angular"}),
    ("finercut", {"compute": 0.2, "windows": 4, "length": 128}),
    ("finercut", {"remove": 3, "windows": 4, "length": 128, "rank": "kl", "blocks": False, "refine": 1,
                  "shortlist": 4}),
    ("search", {"target": "params=0.6", "widths": "0.5,0", "windows": 4, "length": 128}),
    ("search", {"target": "params=0.8", "widths": "0.75,0.5", "windows": 4, "length": 128, "refit": "plain",
                "kv_groups": "none", "query_heads": "2"}),
]

DROP = {"scores", "errors", "latency_table"}  # long per-block lists: summarised by the weight hash instead


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(p.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def quality(model, ref_logp: torch.Tensor, windows: torch.Tensor) -> dict[str, float]:
    """KL(dense || model) and top-1 agreement averaged over every position, ppl; the windows in one batch."""
    from trimformer.evaluate import compare, log_probs

    q = log_probs(model, windows)  # (n, T, V)
    V, n = q.shape[-1], windows.numel()
    kl, agree = compare(q.reshape(-1, V), ref_logp.reshape(-1, V))
    nll = torch.nn.functional.nll_loss(q[:, :-1].reshape(-1, V), windows[:, 1:].reshape(-1))
    return {"kl": kl / n, "top1": agree / n, "ppl": float(torch.exp(nll))}


def run(out: str, only: list[int] | None = None) -> None:
    import trimformer
    from trimformer import data
    from trimformer.models import count_parameters

    torch.set_num_threads(int(os.environ.get("TRIMFORMER_THREADS", "2")))
    dense, tok = trimformer.load("smollm2-135m", with_tokenizer=True)
    calib = data.calibration_windows(tok, n=8, length=256)
    evals = data.evaluation_windows(tok, n=4, length=256)
    from trimformer.evaluate import log_probs

    ref = log_probs(dense, evals)  # (n, T, V)
    rows = []
    for name, settings in [c for i, c in enumerate(CASES) if only is None or i in only]:
        m = copy.deepcopy(dense)
        t0 = time.perf_counter()
        trimformer.prune_(m, trimformer.build(name, settings), calibration=calib, progress=False)
        result = {k: v for k, v in m.trimformer_history[-1]["result"].items() if k not in DROP}
        row = {"method": name, "settings": settings, "result": result, "params": count_parameters(m),
               "weights_sha256": weights_hash(m), **quality(m, ref, evals)}
        print(json.dumps({k: row[k] for k in ("method", "settings", "params", "kl", "ppl")}),
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        rows.append(row)
        del m
    with open(out, "w") as f:
        json.dump(rows, f, indent=1, default=str)


def compare(a_path: str, b_path: str) -> int:
    a, b = (json.load(open(p)) for p in (a_path, b_path))
    bad = 0
    for x, y in zip(a, b, strict=True):
        tag = f"{x['method']} {x['settings']}"
        same_bits = x["weights_sha256"] == y["weights_sha256"]
        shared = {k: y["result"].get(k) for k in x["result"]}  # keys a newer record added are not compared
        diffs = [k for k, (u, v) in {"result": (x["result"], shared), "params": (x["params"], y["params"])}.items()
                 if u != v]
        drift = max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for k in ("kl", "ppl", "top1"))
        ok = not diffs and (same_bits or drift < 1e-5)
        bad += not ok
        print(f"{'OK ' if ok else 'DIFF'} {'bit-identical' if same_bits else f'rel. drift {drift:.1e}'} "
              f"params {y['params']:,} kl {y['kl']:.6f} ppl {y['ppl']:.4f}  {tag}{'  differs: ' + ', '.join(diffs) if diffs else ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the records to this JSON file")
    p.add_argument("--only", type=lambda t: [int(i) for i in t.split(",")],
                   help="run only these cases (0-based indices into CASES, comma-separated)")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two record files")
    args = p.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    run(args.out or "structure_equivalence.json", args.only)
