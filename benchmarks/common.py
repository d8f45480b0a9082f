"""What the benchmark scripts share: BENCHMARK.md's window counts as arguments, the dense model's reference on
P1's doc (and stdlib code) windows, the peer venvs' python, the settings line, and OUT.json + OUT.md written
whole or not at all. Scripts import it as `common` (benchmarks/ is on sys.path when a script runs). It imports
torch and trimformer only when a function needs them: the scripts that measure a process' memory from its
imports on, or only drive subprocesses, stay as light as they were."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from trimformer.evaluate import Reference

RESULTS = Path(__file__).resolve().parent / "results"


def window_args(p: argparse.ArgumentParser, calib: str | None = "--calib", ppl: str | None = None,
                kl: str | None = "--kl-windows", code: str | None = None, kl_default: int = 16,
                length: bool = False) -> argparse.ArgumentParser:
    """P1's window counts, each under the flag a script has always used (None: the script has no such count);
    the defaults are the protocol's: 64 calibration, 64 perplexity, 16 KL / top-1 windows of 512 tokens."""
    if calib:
        p.add_argument(calib, type=int, default=64, help="calibration windows, doc corpus' calibration pool (default %(default)s; P1: 64)")
    if ppl:
        p.add_argument(ppl, type=int, default=64, help="evaluation windows for ppl_doc (default %(default)s; P1: 64)")
    if kl:
        p.add_argument(kl, type=int, default=kl_default, help="evaluation windows for KL / top-1 against the dense model (default %(default)s; P1: 16)")
    if code:
        p.add_argument(code, type=int, default=16, help="stdlib source windows for kl_code, out of domain (default %(default)s)")
    if length:
        p.add_argument("--length", type=int, default=512, help="tokens per window (P1: 512)")
    return p


def threads_arg(p: argparse.ArgumentParser, default: int = 1) -> argparse.ArgumentParser:
    p.add_argument("--threads", type=int, default=default, help="torch threads (1: with the CPU shared, 2 threads "
                   "stall at barriers)")
    return p


def peer_arg(p: argparse.ArgumentParser, default: str) -> argparse.ArgumentParser:
    """--peer-python: the interpreter of the peer's own virtual environment (BENCHMARK.md: one per peer)."""
    p.add_argument("--peer-python", default=default, help="python of the peer's own venv (default %(default)s)")
    return p


def pick(arg: str, table: dict, what: str) -> list[str]:
    """The names of a comma list (--rows, --settings), each checked against `table`; exits naming the unknown."""
    names = [n.strip() for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        sys.exit(f"unknown {what} {unknown}; choose from: {', '.join(table)}")
    return names


def out_arg(p: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    p.add_argument("--out", default=str(RESULTS / name), help=f"writes OUT.json and OUT.md (default: results/{name})")
    return p


def references(dense: torch.nn.Module, tok, doc: int, code: int = 0, length: int = 512,
               dtype: torch.dtype | None = None, tasks: int = 0) -> dict[str, Reference]:
    """The dense model's log-probabilities on P1's first `doc` evaluation windows ('doc') and, when `code`, on
    that many stdlib source windows ('code', out of domain), when `tasks` on that many windows of the zero-shot
    tasks' contexts ('tasks', out of domain, needs the task data): every pruned row is scored against them.
    `dtype`: how they are kept (default float32; float16 halves the memory)."""
    import torch

    from trimformer import data
    from trimformer.evaluate import Reference

    dtype = dtype or torch.float32
    refs = {"doc": Reference(dense, data.evaluation_windows(tok, n=doc, length=length), dtype=dtype)}
    if code:
        refs["code"] = Reference(dense, data.evaluation_windows(tok, n=code, length=length, corpus="code"), dtype=dtype)
    if tasks:
        refs["tasks"] = Reference(dense, data.evaluation_windows(tok, n=tasks, length=length, corpus="tasks"),
                                  dtype=dtype)
    return refs


def environment() -> dict:
    """The settings every result records beside its own: versions and torch threads."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def write_results(out: str | Path, result: dict | list, markdown: str, indent: int = 2) -> Path:
    """OUT.json and OUT.md, each via a temporary file and a rename (an interrupted run leaves the old ones)."""
    from trimformer.io import atomic_file

    out = Path(out)
    atomic_file(out.with_suffix(".json"), json.dumps(result, indent=indent, default=str))
    atomic_file(out.with_suffix(".md"), markdown)
    return out
