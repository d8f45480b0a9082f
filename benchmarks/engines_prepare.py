"""P5 serving, agreement part, step 1 (trimformer's venv): export a checkpoint for the engines and score it here.

    python benchmarks/engines_prepare.py --model OUT_OF_PRUNE --work /tmp/eng/x --formats gguf,deci [--gguf-type f32,q8_0]
    # then, each in its engine's own venv (neither imports trimformer):
    /work/venvs/engines-llamacpp/bin/python benchmarks/engines/llamacpp_agree.py /tmp/eng/x
    /work/venvs/engines-vllm/bin/python benchmarks/engines/vllm_agree.py /tmp/eng/x

Writes WORK/ids.npy (the first `--windows` evaluation windows of the doc corpus, BENCHMARK.md P1), WORK/ref.npy
(our PyTorch model's next-token log-probabilities on them, float32, (W, T, V)), WORK/model-<type>.gguf and WORK/deci/,
and WORK/prepare.json (what was written, the per-layer shapes, parameters and FLOPs per token at 512 tokens).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from trimformer import data, load
from trimformer.evaluate import log_probs
from trimformer.evaluate.cost import flops_per_token
from trimformer.export.deci import save_deci
from trimformer.export.gguf import save_gguf
from trimformer.export.layout import engine_layout
from trimformer.models import anatomy_of, count_parameters


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="a trimformer checkpoint folder or bundled name")
    p.add_argument("--work", required=True)
    p.add_argument("--formats", default="gguf,deci")
    p.add_argument("--gguf-type", default="f32", help="one or more GGUF types, comma-separated")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model, tok = load(a.model, with_tokenizer=True)
    layout = engine_layout(model)
    info = {"model": a.model, "uniform": layout.uniform, "params": count_parameters(model),
            "flops_per_token": flops_per_token(anatomy_of(model), 512),
            "layers": [[s.heads, s.kv_heads, s.ffn] for s in layout.layers], "written": {}}
    formats = a.formats.split(",")
    for qtype in a.gguf_type.split(",") if "gguf" in formats else []:
        t0 = time.perf_counter()
        path = save_gguf(model, work / f"model-{qtype}.gguf", tokenizer=tok, qtype=qtype, overwrite=True)
        info["written"][f"gguf-{qtype}"] = {"path": path.name, "seconds": round(time.perf_counter() - t0, 1)}
    if "deci" in formats:
        try:
            save_deci(model, work / "deci", tokenizer=tok, overwrite=True)
            info["written"]["deci"] = {"path": "deci"}
        except ValueError as e:
            info["written"]["deci"] = {"refused": str(e)}
    ids = data.evaluation_windows(tok, n=a.windows, length=a.length)  # (W, T)
    np.save(work / "ids.npy", ids.numpy().astype(np.int64))
    ref = np.lib.format.open_memmap(work / "ref.npy", mode="w+", dtype=np.float32,
                                    shape=(ids.shape[0], ids.shape[1], layout.vocab))
    for i, w in enumerate(ids):
        ref[i] = log_probs(model, w).numpy()  # (T, V)
    ref.flush()
    (work / "prepare.json").write_text(json.dumps(info, indent=2))
    print(json.dumps({k: v for k, v in info.items() if k != "layers"}, indent=2))


if __name__ == "__main__":
    main()
