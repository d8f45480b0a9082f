"""P5 agreement in stock llama.cpp (llama-cpp-python), teacher-forced on WORK/ids.npy against WORK/ref.npy.

Runs in the llama.cpp venv; imports neither trimformer nor torch. Writes WORK/llamacpp-<gguf>.json:
top-1 agreement and KL(ours || llama.cpp) of next-token distributions over every position of every window, and
the per-layer counts llama.cpp built (from the GGUF's metadata as its loader reads it).

    /work/venvs/engines-llamacpp/bin/python benchmarks/engines/llamacpp_agree.py WORK [--gguf model-f32.gguf]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from llama_cpp import Llama


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("work")
    p.add_argument("--gguf", help="file name inside WORK (default: the only .gguf there)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    work = Path(a.work)
    gguf = work / a.gguf if a.gguf else next(work.glob("*.gguf"))
    ids = np.load(work / "ids.npy")  # (W, T)
    ref = np.load(work / "ref.npy", mmap_mode="r")  # (W, T, V) log-probs of our PyTorch model
    llm = Llama(str(gguf), n_ctx=ids.shape[1], n_batch=ids.shape[1], n_threads=a.threads, logits_all=True,
                verbose=False)
    agree = kl = n = 0.0
    for i, w in enumerate(ids):
        llm.reset()
        llm.eval(w.tolist())
        got = log_softmax(np.asarray(llm.scores[: len(w)], dtype=np.float64))  # (T, V)
        want = np.asarray(ref[i], dtype=np.float64)
        agree += float((got.argmax(-1) == want.argmax(-1)).sum())
        kl += float((np.exp(want) * (want - got)).sum())
        n += len(w)
    meta = {k: v for k, v in llm.metadata.items() if any(s in k for s in ("head_count", "feed_forward", "architecture",
                                                                          "block_count", "key_length"))}
    out = {"gguf": gguf.name, "tokens": int(n), "top1_agree": agree / n, "kl": kl / n, "metadata": meta}
    (work / f"llamacpp-{gguf.stem}.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
