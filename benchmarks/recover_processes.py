"""Recovery in 1 process vs 2 (`accelerate launch`, CPU, gloo) with the same global batch, on smollm2-135m.

Prunes smollm2-135m 50 % by magnitude (no calibration), then runs `trimformer recover` twice on the doc
corpus' calibration half: once in one process with --batch-size 4, once launched by accelerate as 2 processes
with --batch-size 2 each. Both see the same windows at every step (each process takes its half); the loss
curves and the final weights are compared, and both wall times are reported (the 2 processes share this
machine's cores with each other).

    flock /work/heavy.lock nice -n 5 python benchmarks/recover_processes.py --steps 8 --seq-len 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, write_results  # benchmarks/ is on sys.path when run as a script
from safetensors.torch import load_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="global batch (windows per step)")
    ap.add_argument("--out", default=str(RESULTS / "recover_processes"))
    args = ap.parse_args()
    env = {**os.environ, "TRIMFORMER_QUIET": "1"}
    tm = [sys.executable, "-m", "trimformer", "-q"]
    with tempfile.TemporaryDirectory(prefix="trimformer-procs-") as tmp:
        t = Path(tmp)
        subprocess.run([*tm, "prune", "--model", "smollm2-135m", "--method", "magnitude", "--sparsity", "0.5",
                        "--no-eval", "--out", str(t / "pruned")], check=True, env=env)
        common = ["recover", str(t / "pruned"), "--teacher", "smollm2-135m", "--steps", str(args.steps),
                  "--seq-len", str(args.seq_len), "--lr", "1e-4"]
        runs = {}
        for n in (1, 2):
            cmd = [*tm, *common, "--batch-size", str(args.batch), "--out", str(t / "one")] if n == 1 else \
                [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trimformer", "-q",
                 *common, "--batch-size", str(args.batch // 2), "--out", str(t / "two")]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, env=env, capture_output=True)
            runs[n] = {"seconds": time.perf_counter() - t0, "command": " ".join(cmd[1:]),
                       "losses": json.loads((t / ("one" if n == 1 else "two") / "trimformer_recover.json").read_text())
                       ["result"]["losses"]}
        w1, w2 = (load_file(str(t / d / "model.safetensors")) for d in ("one", "two"))
        max_w = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    l1, l2 = runs[1]["losses"], runs[2]["losses"]
    max_rel = max(abs(a - b) / abs(a) for a, b in zip(l1, l2))
    result = {"model": "smollm2-135m (magnitude 50 %)", "steps": args.steps, "seq_len": args.seq_len,
              "global_batch": args.batch, "one_process": runs[1], "two_processes": runs[2],
              "max_rel_loss_diff": max_rel, "max_abs_weight_diff": max_w}
    out = Path(args.out)
    lines = ["# Recovery: 1 process vs 2 (accelerate launch, CPU) with the same global batch", "",
             f"smollm2-135m pruned 50 % by magnitude; `trimformer recover` for {args.steps} steps of {args.batch} "
             f"windows x {args.seq_len} tokens (doc corpus, calibration half), lr 1e-4. "
             f"Command: `python benchmarks/recover_processes.py --steps {args.steps} --seq-len {args.seq_len}`.", "",
             "| step | loss, 1 process (batch 4) | loss, 2 processes (batch 2 each) |", "| ---: | ---: | ---: |"]
    lines += [f"| {i + 1} | {a:.6f} | {b:.6f} |" for i, (a, b) in enumerate(zip(l1, l2))]
    lines += ["", f"Largest relative loss difference: {max_rel:.2e}; largest weight difference: {max_w:.2e}.",
              f"Wall time (this shared 2-core machine): 1 process {runs[1]['seconds']:.0f} s, "
              f"2 processes {runs[2]['seconds']:.0f} s (each run loads the models and tokenizes the corpus)."]
    write_results(out, result, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
