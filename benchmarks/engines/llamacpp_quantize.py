"""Quantise a GGUF with llama.cpp's own quantizer (llama_model_quantize through llama-cpp-python), atomically.

Runs in the llama.cpp venv; imports neither trimformer nor torch. For types the `gguf` library cannot write (the
k-quant mixtures such as Q4_K_M), the same call `trimformer export --gguf-type q4_k_m` makes when llama-cpp-python is
installed beside trimformer. Tensors whose rows are not a multiple of the type's block (256 for k-quants) get
llama.cpp's own fallback type; the log names them.

    /work/venvs/engines-llamacpp/bin/python benchmarks/engines/llamacpp_quantize.py model-f32.gguf model-q4_k_m.gguf q4_k_m
"""

from __future__ import annotations

import argparse
import ctypes
import os
from pathlib import Path

import llama_cpp

FTYPES = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
          "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("type", choices=sorted(FTYPES))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    dst = Path(a.dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[a.type]
    params.nthread = a.threads
    try:
        if llama_cpp.llama_model_quantize(str(a.src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama.cpp could not quantise {a.src} to {a.type}")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
