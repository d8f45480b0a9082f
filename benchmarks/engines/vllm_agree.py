"""P5 agreement in stock vLLM CPU, teacher-forced on WORK/ids.npy against WORK/ref.npy, from WORK/deci/.

Runs in the vLLM venv with no trimformer code: vLLM's own DeciLMForCausalLM, the checkpoint's config class only.
vLLM returns the top-k log-probabilities of each prompt position, so this reports top-1 agreement and the mean
absolute difference of the true token's log-probability (not the full KL). Also writes the per-layer shapes vLLM
built (KV heads, FFN width, 0 = no-op), read from its modules. Writes WORK/vllm.json.

    /work/venvs/engines-vllm/bin/python benchmarks/engines/vllm_agree.py WORK [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from vllm_shapes import built  # a module, so that vLLM can send the function to its worker by reference


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("work")
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function to the worker
    from vllm import LLM, SamplingParams

    work = Path(a.work)
    ids = np.load(work / "ids.npy")  # (W, T)
    ref = np.load(work / "ref.npy", mmap_mode="r")  # (W, T, V)
    llm = LLM(model=str(work / "deci"), trust_remote_code=True, dtype=a.dtype, max_model_len=ids.shape[1] + 8,
              enforce_eager=True, seed=0)
    try:
        shapes = llm.apply_model(built)[0]
    except Exception as e:  # noqa: BLE001 - the shapes are a report extra; agreement below is the check
        shapes = f"unavailable: {e}"
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": w.tolist()} for w in ids], params)
    agree = dnll = n = 0.0
    for i, o in enumerate(outs):
        for t in range(1, ids.shape[1]):
            lp = o.prompt_logprobs[t]  # {token id: Logprob}: the true token and vLLM's rank-1 token
            top = next(tok for tok, v in lp.items() if v.rank == 1)
            want = ref[i, t - 1]
            agree += float(top == int(want.argmax()))
            dnll += abs(lp[int(ids[i, t])].logprob - float(want[ids[i, t]]))
            n += 1
    out = {"dtype": a.dtype, "tokens": int(n), "top1_agree": agree / n, "mean_abs_dlogprob_true": dnll / n,
           "built": shapes}
    (work / "vllm.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
