"""P5 serving speed in stock llama.cpp (llama-cpp-python): prefill and decode tokens/s at batch 1, every GGUF in
one process, the models taken in turn within each round (BENCHMARK.md P2: same process, same threads, alternating).

Runs in the llama.cpp venv; imports neither trimformer nor torch. Prefill: a 512-token prompt (the first evaluation
window) from an empty cache. Decode: then 128 single-token steps (the next window's tokens, teacher-forced: the cost
of a decoding step does not depend on which token is fed). Median over `--runs` rounds after one warm-up round.
Writes OUT (JSON): per file, the median seconds and tokens/s of each phase, and every run's seconds.

    flock /work/heavy.lock nice -n 5 /work/venvs/engines-llamacpp/bin/python benchmarks/engines/llamacpp_speed.py \
        OUT.json A.gguf B.gguf ... --ids WORK/ids.npy --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from llama_cpp import Llama


def one_round(llm: Llama, prompt: list[int], steps: list[int]) -> tuple[float, float]:
    """Seconds of the prefill of `prompt` and of decoding `steps` one token at a time after it."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for tok in steps:
        llm.eval([tok])
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("ggufs", nargs="+")
    p.add_argument("--ids", required=True, help="ids.npy of (W, T) token windows; W >= 2")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    ids = np.load(a.ids)  # (W, T)
    prompt, steps = ids[0, : a.prompt].tolist(), ids[1, : a.decode].tolist()
    llms = {g: Llama(g, n_ctx=a.prompt + a.decode + 8, n_batch=a.prompt, n_ubatch=a.prompt, n_threads=a.threads,
                     n_threads_batch=a.threads, logits_all=False, verbose=False) for g in a.ggufs}
    times: dict[str, list[tuple[float, float]]] = {g: [] for g in a.ggufs}
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    for r in range(a.runs + 1):
        for g, llm in llms.items():
            t = one_round(llm, prompt, steps)
            if r:  # round 0 warms up
                times[g].append(t)
    out = {"threads": a.threads, "prompt_tokens": len(prompt), "decode_tokens": len(steps), "runs": a.runs,
           "loadavg_before": load_before, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3], "files": {}}
    for g, ts in times.items():
        pre, dec = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        out["files"][g] = {"prefill_s": pre, "decode_s": dec, "prefill_tok_s": len(prompt) / pre,
            "decode_tok_s": len(steps) / dec, "runs_s": [[round(x, 4) for x in t] for t in ts]}
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({k: {m: round(v[m], 1) for m in ("prefill_tok_s", "decode_tok_s")}
                      for k, v in out["files"].items()}, indent=2))


if __name__ == "__main__":
    main()
