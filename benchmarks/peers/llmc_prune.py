"""Run llm-compressor's one-shot pruning (in its own venv) on given calibration windows; save the pruned weights.

Used by benchmarks/p1_weights.py as a subprocess with /work/peers/llmc/bin/python. Writes the decoder layers'
state dict (torch.save) and a JSON line with the wall and CPU time of `oneshot` and the peak RSS while it ran.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent))  # benchmarks/: torch-only helpers
from peak_memory import make_resident  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="HF directory of the dense model")
    p.add_argument("--calib", required=True, help="torch file with the (n, T) calibration windows")
    p.add_argument("--method", choices=["sparsegpt", "wanda"], required=True)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default="0:0", help="llm-compressor mask_structure: 0:0 (unstructured) or 2:4")
    p.add_argument("--profile", choices=["uniform", "owl"], default="uniform",
                   help="llm-compressor sparsity_profile (owl: its outlier-weighted layer sparsity)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype the model is loaded and pruned in (match the model trimformer prunes)")
    p.add_argument("--out", required=True)
    a = p.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(torch.get_num_threads())
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype))
    windows = torch.load(a.calib)  # (n, T)
    ds = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    cls = SparseGPTModifier if a.method == "sparsegpt" else WandaPruningModifier
    # the OWL paper's setting (M = 5, lambda = 0.08), also trimformer's OWL default
    extra = {"sparsity_profile": "owl", "owl_m": 5, "owl_lmbda": 0.08} if a.profile == "owl" else {}
    modifier = cls(sparsity=a.sparsity, mask_structure=a.pattern, targets=["Linear"], ignore=["lm_head"], **extra)

    make_resident(model)  # the checkpoint's pages are the model's, not the pruning run's
    base = rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0, c0 = time.perf_counter(), time.process_time()
    oneshot(model=model, dataset=ds, recipe=[modifier], num_calibration_samples=windows.shape[0],
            max_seq_length=windows.shape[1], shuffle_calibration_samples=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    stop.set()
    th.join()
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if ".layers." in k}
    torch.save(state, a.out)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "rss_base": base, "rss_peak": peak[0]}))


if __name__ == "__main__":
    main()
