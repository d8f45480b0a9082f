"""P5 agreement in stock vLLM CPU, teacher-forced on WORK/ids.npy against WORK/ref.npy, from WORK/deci/.

Runs in the vLLM venv with no trimformer code: vLLM's own DeciLMForCausalLM, the checkpoint's config class only.
vLLM returns the top-k log-probabilities of each prompt position, so this reports top-1 agreement and the mean
absolute difference of the true token's log-probability (not the full KL). Also writes the per-layer shapes vLLM
built (KV heads, FFN width, 0 = no-op), read from its modules. Writes WORK/vllm.json.

With --batch N (the P5 throughput figure, taken after agreement in the same process, so one model load serves both;
run it under the heavy lock): N requests at once, each a --prompt-token slice of the evaluation windows and --gen
greedy tokens forced (ignore_eos), prefix caching off so that every round prefills again; one warm-up round, then
--rounds timed rounds of `LLM.generate`, their median. Also a prefill-only round set (max_tokens=1). Throughput is
all tokens processed (N * (prompt + gen)) per second; output tokens/s beside it.

    /work/venvs/engines-vllm/bin/python benchmarks/engines/vllm_agree.py WORK [--dtype float32] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
from vllm_shapes import built  # a module, so that vLLM can send the function to its worker by reference


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("work")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=0, help="also time N requests at once (0: agreement only)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model sends a function to the worker
    from vllm import LLM, SamplingParams

    work = Path(a.work)
    ids = np.load(work / "ids.npy")  # (W, T)
    ref = np.load(work / "ref.npy", mmap_mode="r")  # (W, T, V)
    llm = LLM(model=str(work / "deci"), trust_remote_code=True, dtype=a.dtype,
              max_model_len=max(ids.shape[1], a.prompt + a.gen) + 8, enforce_eager=True, seed=0,
              enable_prefix_caching=False, max_num_seqs=max(a.batch, 8))
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
    if a.batch:
        out["speed"] = throughput(llm, ids, a.batch, a.prompt, a.gen, a.rounds)
    (work / "vllm.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


def throughput(llm, ids: np.ndarray, batch: int, prompt: int, gen: int, rounds: int) -> dict:
    """Median seconds of `batch` requests at once: prefill only (1 token out) and prefill + `gen` tokens out."""
    from vllm import SamplingParams

    flat = ids.reshape(-1)
    if flat.size < batch * prompt:
        raise SystemExit(f"{flat.size} evaluation tokens cannot make {batch} prompts of {prompt}")
    reqs = [{"prompt_token_ids": flat[i * prompt: (i + 1) * prompt].tolist()} for i in range(batch)]
    kinds = {"prefill": SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
             "generate": SamplingParams(max_tokens=gen, min_tokens=gen, temperature=0.0, ignore_eos=True)}
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds + 1):
        for k, sp in kinds.items():  # alternating within the round
            t0 = time.perf_counter()
            outs = llm.generate(reqs, sp, use_tqdm=False)
            dt = time.perf_counter() - t0
            assert all(len(o.outputs[0].token_ids) == sp.max_tokens for o in outs)
            if r:  # round 0 warms up
                times[k].append(dt)
    pre, full = statistics.median(times["prefill"]), statistics.median(times["generate"])
    return {"batch": batch, "prompt_tokens": prompt, "gen_tokens": gen, "rounds": rounds,
            "prefill_s": pre, "generate_s": full, "prefill_tok_s": batch * prompt / pre,
            "throughput_tok_s": batch * (prompt + gen) / full, "output_tok_s": batch * gen / full,
            "runs_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
            "loadavg_before": load_before, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3]}


if __name__ == "__main__":
    main()
