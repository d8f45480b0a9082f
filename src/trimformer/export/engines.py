"""Serving-engine formats chosen by name: what `--format deci|gguf` of `prune` and `export` write.

    EngineFormat("gguf", gguf_type="f16").save(model, tok, "out/")          # out/model-f16.gguf + extra files
    EngineFormat("deci").save(model, tok, "out/", extra_files={...})        # a DeciLM folder vLLM loads
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import nn

from ..io import atomic_dir, write_files
from .deci import save_deci
from .gguf import save_gguf

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")


@dataclass(frozen=True)
class EngineFormat:
    """deci: DeciLM / Nemotron-NAS block_configs that stock vLLM loads; gguf: one llama.cpp file.
    allow_zeros: write weight-pruned (sparse) projections densely anyway (no speed in the engines)."""

    format: Literal["deci", "gguf"]
    gguf_type: str = "f16"
    gguf_pre: str | None = None
    allow_zeros: bool = False

    def __post_init__(self) -> None:
        if self.format not in ("deci", "gguf"):
            raise ValueError(f"format {self.format!r}: the serving formats are deci and gguf")
        if self.gguf_type not in GGUF_TYPES:
            raise ValueError(f"--gguf-type {self.gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")

    def check(self) -> None:
        """Fail before any heavy work on what would only fail at the save."""
        if self.format == "gguf" and self.gguf_type == "q4_k_m" and importlib.util.find_spec("llama_cpp") is None:
            raise ValueError("--gguf-type q4_k_m is made by llama.cpp's quantizer: install llama-cpp-python, or write "
                             "--gguf-type f32 and run `llama-quantize model.gguf model-q4_k_m.gguf Q4_K_M`")

    def default_out(self, model: str) -> str:
        name = str(model).rstrip("/")
        return f"{name}-{self.gguf_type}.gguf" if self.format == "gguf" else f"{name}-{self.format}"

    def save(self, model: nn.Module, tokenizer: Any, out: str | os.PathLike, *, overwrite: bool = False,
             extra_files: dict[str, Any] | None = None) -> Path:
        """deci: a DeciLM folder; gguf: a .gguf file, or (with extra files) a folder holding model-<type>.gguf."""
        out = Path(out)
        if self.format == "deci":
            return save_deci(model, out, tokenizer=tokenizer, overwrite=overwrite, extra_files=extra_files,
                             allow_zeros=self.allow_zeros)
        kw = {"tokenizer": tokenizer, "qtype": self.gguf_type, "allow_zeros": self.allow_zeros,
              "tokenizer_pre": self.gguf_pre}
        if extra_files is None:
            return save_gguf(model, out, overwrite=overwrite, **kw)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            save_gguf(model, tmp / f"model-{self.gguf_type}.gguf", **kw)
            write_files(tmp, extra_files)
        return out
