"""Data-parallel calibration (parallel.py): wall time of N processes against one, on the same cores.

    flock /work/heavy.lock nice -n 5 python benchmarks/parallel_calibration.py [--method sparsegpt] [--procs 2]

Runs `trimformer prune --model smollm2-135m --method M --sparsity 0.5 --no-eval` once in one process with
`--cores` threads, then under `torchrun --nproc-per-node N` (gloo) with cores / N threads per process, so both
use the same cores. Reports each command's wall time, the pruning step's own seconds (trimformer.json history)
and whether the two checkpoints have the same zero masks (and how far their weights are apart).
Results: benchmarks/results/parallel_calibration.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, write_results  # benchmarks/ is on sys.path when run as a script


def prune(out: Path, procs: int, threads: int, args: argparse.Namespace) -> dict:
    cmd = ["-m", "trimformer", "prune", "--model", args.model, "--method", args.method, "--sparsity", "0.5",
           "--calib-windows", str(args.windows), "--no-eval", "--quiet", "--out", str(out),
           "--set", f"precision={args.precision}"]
    argv = [sys.executable, *cmd] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{' '.join(argv)} failed:\n{proc.stderr[-2000:]}")
    history = json.loads((out / "trimformer.json").read_text())["history"]
    return {"processes": procs, "threads_each": threads, "wall_s": wall, "step_s": sum(h["seconds"] for h in history),
            "load_before": load, "command": f"OMP_NUM_THREADS={threads} python " + " ".join(argv[1:])}


def compare(a: Path, b: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    x, y = tensors(a), tensors(b)
    pruned = [k for k in x if k.endswith("proj.weight")]
    flipped = sum(int(((x[k] == 0) != (y[k] == 0)).sum()) for k in pruned)
    total = sum(x[k].numel() for k in pruned)
    diff = max((x[k].float() - y[k].float()).abs().max().item() for k in x)
    return {"projections": len(pruned), "same_masks": flipped == 0, "mask_entries_differing": flipped,
            "mask_share_differing": flipped / total, "max_weight_diff": diff}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="sparsegpt", choices=["wanda", "sparsegpt", "magnitude"])
    p.add_argument("--windows", type=int, default=64, help="calibration windows of 512 tokens")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="dtype of the calibration forwards (auto: bf16 where the CPU multiplies it natively); fp32 "
                        "tells rounding in the bf16 forwards apart from the order the statistics are summed in")
    p.add_argument("--cores", type=int, default=2, help="threads of the one process; each of N gets cores / N")
    p.add_argument("--out", default=str(RESULTS / "parallel_calibration"), help="results: OUT.json and OUT.md")
    args = p.parse_args()
    if args.cores % args.procs:
        sys.exit(f"--cores {args.cores} must be a multiple of --procs {args.procs}, so both runs use the same cores")
    work = Path(tempfile.mkdtemp(prefix="parallel-calibration-"))
    try:
        one = prune(work / "one", 1, args.cores, args)
        many = prune(work / "many", args.procs, args.cores // args.procs, args)
        same = compare(work / "one", work / "many")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {"model": args.model, "method": args.method, "windows": args.windows, "cores": args.cores,
           "precision": args.precision,
           "runs": [one, many], "wall_ratio": many["wall_s"] / one["wall_s"],
           "step_ratio": many["step_s"] / one["step_s"], **same}
    lines = [f"# Data-parallel calibration: {args.procs} processes vs 1 on {args.cores} cores "
             f"({args.model}, {args.method} 50 %, {args.windows} windows x 512 tokens, precision {args.precision}, CPU, "
             "gloo)", "",
             "| processes | threads each | wall s | pruning step s | load avg before | command |",
             "| ---: | ---: | ---: | ---: | ---: | --- |"]
    lines += [f"| {r['processes']} | {r['threads_each']} | {r['wall_s']:.1f} | {r['step_s']:.1f} | "
              f"{r['load_before']:.1f} | `{r['command']}` |" for r in res["runs"]]
    lines += ["", f"Ratio {args.procs} processes / 1: wall {res['wall_ratio']:.2f}, pruning step {res['step_ratio']:.2f}. "
              f"Zero masks of the {same['projections']} projections: {same['mask_entries_differing']:,} entries differ "
              f"({same['mask_share_differing']:.2e} of them); largest weight difference {same['max_weight_diff']:.2e} "
              "(a weight kept in one run and cut in the other: near-ties in the scores, whose statistics are summed "
              "in another order and computed with other thread counts).", ""]
    dest = Path(args.out)
    write_results(dest, res, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
