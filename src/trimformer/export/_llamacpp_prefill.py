"""Time the prefill of one GGUF file in llama.cpp; run as a script by a Python that has llama-cpp-python.

    PYTHON _llamacpp_prefill.py '{"gguf": "m.gguf", "baseline": "dense.gguf", "tokens": 512, "runs": 3, "threads": 1}'

Imports neither trimformer nor torch (the engine's Python need not have them). Loads the file (and the optional
baseline) once, then times `runs` prefills of `tokens` token ids from an empty cache after one warm-up round, the
baseline and the file taken in turn within each round (a shared machine's load then weighs on both alike), and
prints one JSON line: {"prefill_s": median seconds, "runs_s": [...], "baseline_s": median seconds or null}.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

from llama_cpp import Llama


def main() -> None:
    a = json.loads(sys.argv[1])
    n, threads = int(a["tokens"]), int(a["threads"])
    files = [f for f in (a.get("baseline"), a["gguf"]) if f]
    llms = [Llama(f, n_ctx=n + 8, n_batch=n, n_ubatch=n, n_threads=threads, n_threads_batch=threads,
                  logits_all=False, verbose=False) for f in files]
    vocab = min(llm.n_vocab() for llm in llms)
    ids = [(7919 * i + 13) % vocab for i in range(n)]  # any ids: the cost of a prefill does not depend on them
    runs: list[list[float]] = [[] for _ in llms]
    for r in range(int(a["runs"]) + 1):
        for llm, ts in zip(llms, runs):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            if r:  # round 0 warms up
                ts.append(time.perf_counter() - t0)
    print(json.dumps({"prefill_s": statistics.median(runs[-1]), "runs_s": runs[-1],
                      "baseline_s": statistics.median(runs[0]) if len(llms) > 1 else None}))


if __name__ == "__main__":
    main()
