"""Time the prefill of one GGUF file in llama.cpp; run as a script by a Python that has llama-cpp-python.

    PYTHON _llamacpp_prefill.py '{"gguf": "m.gguf", "tokens": 512, "runs": 3, "threads": 1}'

Imports neither trimformer nor torch (the engine's Python need not have them). Loads the file once, then times
`runs` prefills of `tokens` token ids from an empty cache after one warm-up prefill, and prints one JSON line:
{"prefill_s": median seconds, "runs_s": [seconds of each run]}.
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
    llm = Llama(a["gguf"], n_ctx=n + 8, n_batch=n, n_ubatch=n, n_threads=threads, n_threads_batch=threads,
                logits_all=False, verbose=False)
    vocab = llm.n_vocab()
    ids = [(7919 * i + 13) % vocab for i in range(n)]  # any ids: the cost of a prefill does not depend on them
    runs = []
    for r in range(int(a["runs"]) + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        if r:  # run 0 warms up
            runs.append(time.perf_counter() - t0)
    print(json.dumps({"prefill_s": statistics.median(runs), "runs_s": runs}))


if __name__ == "__main__":
    main()
