"""A recipe end to end: load -> calibrate -> steps -> evaluate -> export. `trimformer prune` only calls `run`.

    job = trimformer.pipeline.Job(model="smollm2-135m", recipe=trimformer.Recipe.one("wanda", sparsity=0.5),
                                  out="pruned/")
    result = trimformer.pipeline.run(job)      # result.model, result.report, result.out

Everything that can be checked is checked before the model loads: the recipe's names and values, the
output location (never the input, writable, enough disk), the calibration window length against the model.
Before any work the run says what it needs ("needs ~X GB in memory, Y GB on disk"); with `offload='auto'` it
streams the model from disk (models/offload.py) when it would not fit comfortably in memory. Launched by
`torchrun --nproc-per-node N`, every process calibrates on its share of the windows and process 0 evaluates
and writes (parallel.py).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, data, parallel
from .api import prune_
from .evaluate import evaluate, to_markdown
from .evaluate.tasks import TaskEval, check_data
from .export import save
from .export.engines import EngineFormat
from .export.layout import ExportError
from .export.streamed import write_streamed
from .io import atomic_dir, check_output
from .methods import Recipe
from .models.footprint import Footprint, footprint
from .models.load import (
    OFFLOAD,
    default_dtype,
    dtype_name,
    estimate_bytes,
    load,
    parse_dtype,
    resolve_device,
    resolve_local,
    skeleton_of,
)
from .progress import quiet
from .steps import check_supported

__all__ = ["EvalOptions", "Job", "Result", "run"]


@dataclass
class EvalOptions:
    """BENCHMARK.md P1/P2 on the doc corpus' evaluation pool."""

    windows: int = 64
    kl_windows: int = 16
    code_windows: int = 8
    length: int = 512
    measure_speed: bool = True
    speed_runs: int = 5
    tasks: str | list[str] | None = None  # zero-shot tasks through lm-eval (evaluate/tasks.py)
    limit: int | None = None
    task_batch_size: int = 8

    def __post_init__(self) -> None:
        for name in ("code_windows", "windows"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0 (0: none), got {getattr(self, name)}")
        if self.windows == 0 and not self.tasks:
            raise ValueError("--eval-windows 0 measures no quality; give --tasks, or --no-eval for no report")
        self.task_eval = None if not self.tasks else TaskEval(tasks=self.tasks, limit=self.limit,
                                                              batch_size=self.task_batch_size)
        for name in ("kl_windows", "speed_runs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.length < 2:
            raise ValueError(f"--eval-length must be >= 2, got {self.length}")

    def __call__(self, model: nn.Module, tokenizer: Any, reference: nn.Module | None) -> dict:
        return evaluate(model, tokenizer, reference=reference, windows=self.windows, kl_windows=self.kl_windows,
                        code_windows=self.code_windows, length=self.length, measure_speed=self.measure_speed,
                        speed_runs=self.speed_runs, progress=not quiet(), tasks=self.task_eval)


@dataclass
class Job:
    """What `trimformer prune` does. evaluation=None skips the report; out=None keeps the model in memory;
    engine: write `out` in a serving engine's format (export.engines) instead of our own."""

    model: str
    recipe: Recipe
    out: str | None = None
    overwrite: bool = False
    calib: str = data.AUTO  # resolved on construction (data.resolve_source): the report names the text used
    calib_field: str = "text"
    calib_windows: int = 64
    calib_length: int = 512
    batch_size: int = 1
    evaluation: EvalOptions | None = field(default_factory=EvalOptions)
    command: str | None = None
    engine: EngineFormat | None = None
    device: str = "auto"  # cpu | cuda | cuda:N | auto (a GPU when there is one)
    dtype: str | None = None  # float32 | bfloat16 | float16: the weights while pruning and in the checkpoint written
    # (None: float32, or a bundled model's own default)
    offload: str = "auto"  # none | disk (stream from disk) | auto (stream when it would not fit in memory)

    def __post_init__(self) -> None:
        if self.calib_windows < 1 or self.calib_length < 2:
            raise ValueError(f"need at least 1 calibration window of at least 2 tokens, got --calib-windows "
                             f"{self.calib_windows} --calib-length {self.calib_length}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"--batch-size must be a positive integer, got {self.batch_size}")
        if self.offload not in OFFLOAD:
            raise ValueError(f"--offload {self.offload}: choose {', '.join(OFFLOAD)}")
        self.calib = data.resolve_source(self.calib)
        self.dtype = dtype_name(parse_dtype(default_dtype(self.model) if self.dtype is None else self.dtype))
        self.recipe.build()  # every name and value checked before any heavy work


@dataclass
class Result:
    model: nn.Module
    tokenizer: Any
    report: dict | None
    out: Path | None
    seconds: dict[str, float]


def _stderr(*parts: Any) -> None:
    if not quiet():
        print(*parts, file=sys.stderr)


def plan(job: Job, steps: list, device: torch.device) -> tuple[Footprint | None, bool]:
    """The run's footprint (None when the model's config is not local) and whether it streams from disk."""
    skeleton = skeleton_of(job.model, job.dtype)
    fp = None if skeleton is None else footprint(
        skeleton, dtype=parse_dtype(job.dtype), device=device, windows=job.calib_windows, length=job.calib_length,
        batch_size=job.batch_size, hessian=any(getattr(s, "needs_hessian", False) for s in steps),
        dense_stream=any(getattr(s, "dense_targets", False) for s in steps), evaluation=job.evaluation is not None)
    streaming = job.offload == "disk" or (job.offload == "auto" and fp is not None and not fp.fits())
    return fp, streaming


def run(job: Job, say: Callable[..., None] = _stderr) -> Result:
    """Run `job`; the output folder appears only when everything succeeded."""
    steps = job.recipe.build()
    if job.evaluation is not None and job.evaluation.task_eval is not None:
        check_data(job.evaluation.task_eval)  # a bad task name or missing data fails before the model loads
    if job.engine is not None:
        job.engine.check()
    device = parallel.init(resolve_device(job.device))
    if job.out is not None:
        # the pruned checkpoint is at most the dense one's size (fp32); a little room for the reports
        check_output(job.out, overwrite=job.overwrite, inputs=[p for p in [resolve_local(job.model)] if p],
                     need_bytes=int(1.05 * estimate_bytes(job.model)) + (1 << 20))
    fp, streaming = plan(job, steps, device)
    check_supported(steps, streamed=streaming, processes=parallel.size())
    if streaming and job.engine is not None:
        raise ValueError(f"--format {job.engine.format} writes the model from memory, and this run streams it from "
                         "disk: write --format hf (the default) and convert it with `trimformer export --format "
                         f"{job.engine.format}` where it fits, or pass --offload none")
    if parallel.is_main():
        say(f"{job.model} on {device} in {job.dtype}"
            + (f", {parallel.size()} processes" if parallel.size() > 1 else "") + ": "
            + (fp.describe(streaming) if fp is not None else "memory estimate unavailable (the model's config is "
               "not on this machine)"))
    if streaming:
        return _run_streamed(job, device, fp, say)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tok = load(job.model, with_tokenizer=True, dtype=job.dtype, device=device)
    seconds["load"] = time.perf_counter() - t0
    say(f"loaded {job.model} in {seconds['load']:.1f} s")
    calib = _calibration(job, model, tok, steps, say)
    t0 = time.perf_counter()
    prune_(model, job.recipe, calibration=calib, batch_size=job.batch_size, progress=not quiet())
    seconds["prune"] = time.perf_counter() - t0
    for h in model.trimformer_history:
        say(f"{h['method']}: {h['seconds']:.1f} s")
    if not parallel.is_main():  # process 0 evaluates and writes
        return Result(model, tok, None, None, seconds)
    report = None
    if job.evaluation is not None:
        report = job.evaluation(model, tok, load(job.model, dtype=job.dtype, device=device))
        report["calibration"] = _calibration_info(job, calib)
    out = None
    if job.out is not None:
        files = _files(job, model, report, calib)
        if job.engine is None:
            out = save(model, job.out, tokenizer=tok, extra_files=files, overwrite=job.overwrite)
        else:
            try:
                out = job.engine.save(model, tok, job.out, overwrite=job.overwrite, extra_files=files)
            except ExportError as e:  # the cut is not lost: saved in our own format, and the reason is the error
                save(model, job.out, tokenizer=tok, extra_files=files, overwrite=job.overwrite)
                raise ExportError(f"{e} (saved {job.out}/ in trimformer's own format instead)") from e
    return Result(model, tok, report, out, seconds)


def _run_streamed(job: Job, device: torch.device, fp: Footprint | None, say: Callable[..., None]) -> Result:
    """The run with the model streamed from disk: its blocks are written into the output folder as they are
    pruned, so finishing the checkpoint is a rename per block (and a copy of the parts never changed)."""
    steps = job.recipe.build()
    seconds: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        if job.out is not None and parallel.is_main():
            folder = stack.enter_context(atomic_dir(job.out, overwrite=job.overwrite))
        elif job.out is None and parallel.is_main():
            folder = Path(tempfile.mkdtemp(prefix="trimformer-stream-"))  # lives as long as the model (below)
        else:
            folder = None
        folder = Path(parallel.broadcast_object(str(folder) if folder is not None else None))
        t0 = time.perf_counter()
        model, tok = load(job.model, with_tokenizer=True, dtype=job.dtype, device=device, offload="disk",
                          offload_dir=folder)
        if job.out is None and parallel.is_main():
            weakref.finalize(model, shutil.rmtree, folder, True)
        if fp is not None:
            model.trimformer_offload.activation_budget = fp.spill_budget
        calib = _calibration(job, model, tok, steps, say)
        prune_(model, job.recipe, calibration=calib, batch_size=job.batch_size, progress=not quiet())
        seconds["prune"] = time.perf_counter() - t0
        for h in model.trimformer_history:
            say(f"{h['method']}: {h['seconds']:.1f} s")
        if job.evaluation is not None and parallel.is_main():
            say("evaluation skipped: a streamed model is not evaluated in this run (it would not fit in memory); "
                "run `trimformer eval` on the output where it fits")
        if job.out is not None and parallel.is_main():
            write_streamed(model, folder, tokenizer=tok, extra_files=_files(job, model, None, calib))
        parallel.barrier()
    out = None
    if job.out is not None and parallel.is_main():
        out = Path(job.out)
        model.trimformer_offload.rebase(folder, out)
    return Result(model, tok, None, out, seconds)


def _calibration(job: Job, model: nn.Module, tok: Any, steps: list, say: Callable[..., None]) -> torch.Tensor | None:
    if not any(s.needs_calibration for s in steps):
        return None
    if parallel.is_main():
        say(f"calibration: {job.calib_windows} windows of {job.calib_length} tokens from {job.calib!r}"
            + (" (docs and natural prose in turn; --calib docs for the doc corpus alone)" if job.calib == "mix" else ""))
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and job.calib_length > limit:
        raise ValueError(f"--calib-length {job.calib_length} is longer than the model's {limit} positions; "
                         f"use --calib-length {limit} or less")
    return data.calibration_windows(tok, job.calib, n=job.calib_windows, length=job.calib_length,
                                    field=job.calib_field)


def _calibration_info(job: Job, calib: torch.Tensor | None) -> dict | None:
    return None if calib is None else {"source": job.calib, "windows": job.calib_windows,
                                       "window_tokens": job.calib_length}


def _files(job: Job, model: nn.Module, report: dict | None, calib: torch.Tensor | None = None) -> dict[str, Any]:
    meta = {"trimformer": __version__, "model": job.model, "command": job.command, "recipe": job.recipe.to_list(),
            "history": model.trimformer_history, "device": job.device, "dtype": job.dtype,
            "processes": parallel.size(), "calibration": _calibration_info(job, calib)}
    files: dict[str, Any] = {"trimformer.json": meta}
    if report is not None:
        files.update({"report.json": report, "report.md": to_markdown(report)})
    return files
