"""The search's prefill latency table measured in llama.cpp (`search --latency-from llamacpp`).

llama.cpp's relative costs differ from PyTorch eager's (its f32 GEMM, its attention kernel, FFN widths that are
not a multiple of 16/32 falling back to a generic kernel), so a latency target met in PyTorch is missed there.
llama.cpp times whole models, so the per-block table is solved from whole-model prefills, each a GGUF (f32, our
writer, llama.cpp's `deci` architecture when the blocks differ) timed in a subprocess of a Python that has
llama-cpp-python (`--engine-python`, $TRIMFORMER_ENGINE_PYTHON, else this one), in turn with the model as it is in
the same process (its time is kept as a ratio to that baseline, so a shared machine's drifting load cancels):

    T_ref          the model with one block r kept (dense), the first of the most common shape;
    T(g, o)        r dense and every other block of shape g taking option o, the rest removed;
    c(g, o)      = (T(g, o) - T_ref) / that number of blocks    (seconds per block; removed: 0)
    fixed_s      = T_ref - c(shape of r, dense)                 (embedding, final norm, head)
    dense_s      = fixed_s + sum over blocks of c(shape, dense)

A GGUF cannot hold a model without blocks (no attention left), hence the one-block reference rather than an empty
model. FFN widths are those the search builds (`keep_n` with its `multiple_of`), so a width llama.cpp runs slowly
costs what it costs there. Blocks of one shape share a measurement, as in `structure.options.latency_table`.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..models import Anatomy, anatomy_of
from ..progress import bar
from ..structure import surgery
from ..structure.options import ENGINE_LATENCY, Option, block_shape, take_option
from .gguf import write_gguf

ENV = "TRIMFORMER_ENGINE_PYTHON"
SCRIPT = Path(__file__).with_name("_llamacpp_prefill.py")
INSTALL = "pip install llama-cpp-python==0.3.36"


@dataclass(frozen=True)
class Variant:
    """One model to time: block `ref` dense plus `blocks` (all of shape `shape`) taking `option`; none: the reference."""

    shape: tuple | None
    option: Option | None
    blocks: tuple[int, ...]


def plan(anatomy: Anatomy, opts: list[Option]) -> tuple[int, list[Variant]]:
    """The reference block and the models to time: the reference first, then one per (shape, offered option)."""
    members: dict[tuple, list[int]] = {}
    for b in anatomy.blocks:
        members.setdefault(block_shape(b), []).append(b.index)
    ref = max(members.values(), key=len)[0]
    if len(members[block_shape(anatomy.blocks[ref])]) < 2:
        raise ValueError("--latency-from llamacpp needs two blocks of one shape (the part outside the blocks is "
                         "told apart from a one-block model); every block of this model differs: use --latency-from torch")
    variants = [Variant(None, None, ())]
    for shape, idx in members.items():
        rest = tuple(i for i in idx if i != ref)
        variants += [Variant(shape, o, rest) for o in opts if o.attn or o.ffn > 0]
    return ref, variants


def variant_model(anatomy: Anatomy, ref: int, v: Variant, multiple_of: int) -> nn.Module:
    """A copy of the model with v's blocks taking its option, block `ref` dense, every other block removed."""
    model = copy.deepcopy(anatomy.model)
    an = anatomy_of(model)
    for i in v.blocks:
        take_option(an, an.blocks[i], v.option, multiple_of)
    surgery.remove_blocks(an, [i for i in range(len(an.blocks)) if i != ref and i not in v.blocks])
    return model


def assemble(anatomy: Anatomy, opts: list[Option], ref: int, variants: list[Variant],
             times: list[float]) -> dict[str, Any]:
    """The latency table (as `latency_table` returns it) from the prefill seconds of each variant, in order. A
    difference below 0 (timing noise around a near-free option) counts as 0."""
    t_ref = times[0]
    cost = {(v.shape, v.option): max(0.0, (t - t_ref) / len(v.blocks)) for v, t in zip(variants[1:], times[1:])}
    rows = [{o: cost[block_shape(b), o] if o.attn or o.ffn > 0 else 0.0 for o in opts} for b in anatomy.blocks]
    full = Option(True, 1.0)
    fixed = max(0.0, t_ref - rows[ref][full])
    return {"dense_s": fixed + sum(r[full] for r in rows), "fixed_s": fixed, "blocks": rows}


def engine_python(python: str = "") -> str:
    """The Python that runs llama.cpp: `python`, else $TRIMFORMER_ENGINE_PYTHON, else this one; checked to import
    llama_cpp (a one-line error naming the install otherwise)."""
    py = python or os.environ.get(ENV) or sys.executable
    try:
        ok = subprocess.run([py, "-c", "import llama_cpp"], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        raise ValueError(f"--latency-from llamacpp: {py} cannot import llama_cpp; install it there (`{INSTALL}`), "
                         f"or pass --engine-python PATH (or set {ENV}) naming a Python that has it")
    return py


@dataclass
class LlamaCppTimer:
    """Median prefill seconds of a GGUF in llama.cpp: `tokens` tokens from an empty cache, batch 1, `threads`
    threads, `runs` runs after a warm-up, one subprocess of `python` per file. With a `baseline` file, it is timed
    in turn with each file in the same process and the file's time is returned in units of the baseline's first
    median (file / baseline x that): a shared machine's load drifting from one file to the next then cancels."""

    python: str
    tokens: int = 512
    runs: int = 3
    threads: int = 1
    baseline: Path | None = None
    scale: float | None = None  # the baseline's median seconds in the first call

    def __call__(self, gguf: Path) -> float:
        args = json.dumps({"gguf": str(gguf), "baseline": self.baseline and str(self.baseline), "tokens": self.tokens,
                           "runs": self.runs, "threads": self.threads})
        p = subprocess.run([self.python, str(SCRIPT), args], capture_output=True, text=True)
        if p.returncode:
            why = (p.stderr.strip().splitlines() or ["no message"])[-1]
            raise RuntimeError(f"llama.cpp could not time {gguf.name} ({self.python}): {why}")
        out = json.loads(p.stdout.strip().splitlines()[-1])
        if out["baseline_s"] is None:
            return float(out["prefill_s"])
        self.scale = self.scale or float(out["baseline_s"])
        return float(out["prefill_s"]) / float(out["baseline_s"]) * self.scale


def llamacpp_latency_table(anatomy: Anatomy, opts: list[Option], *, tokens: int = 512, runs: int = 3,
                           multiple_of: int = 1, threads: int = 1, python: str = "",
                           timer: Callable[[Path], float] | None = None, progress: bool = False) -> dict[str, Any]:
    """Prefill seconds of every option of every block, and of the part outside the blocks, measured in llama.cpp
    (see the module docstring). `timer`: seconds of one GGUF file (default: LlamaCppTimer in `python`, each file
    timed in turn with the model as it is)."""
    ref, variants = plan(anatomy, opts)
    times = []
    with tempfile.TemporaryDirectory(prefix="trimformer-llamacpp-") as tmp:
        if timer is None:  # the model as it is, timed beside every variant
            timer = LlamaCppTimer(engine_python(python), tokens=tokens, runs=runs, threads=threads,
                                  baseline=Path(tmp) / "baseline.gguf")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                write_gguf(anatomy.model, timer.baseline, qtype="f32")
        for j, v in enumerate(bar(variants, desc="search: llama.cpp latency table", unit="model",
                                  disable=not progress)):
            path = Path(tmp) / f"variant{j}.gguf"
            with warnings.catch_warnings():  # an unaligned FFN width is what it is here: its time goes in the table
                warnings.simplefilter("ignore")
                write_gguf(variant_model(anatomy, ref, v, multiple_of), path, qtype="f32")
            times.append(timer(path))
            path.unlink()
    return assemble(anatomy, opts, ref, variants, times)


ENGINE_LATENCY["llamacpp"] = llamacpp_latency_table
