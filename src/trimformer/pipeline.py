"""A recipe end to end: load -> calibrate -> steps -> evaluate -> export. `trimformer prune` only calls `run`.

    job = trimformer.pipeline.Job(model="smollm2-135m", recipe=trimformer.Recipe.one("wanda", sparsity=0.5),
                                  out="pruned/")
    result = trimformer.pipeline.run(job)      # result.model, result.report, result.out

Everything that can be checked is checked before the model loads: the recipe's names and values, the
output location (never the input, writable, enough disk), the calibration window length against the model.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from . import __version__, data
from .api import prune_
from .evaluate import evaluate, to_markdown
from .evaluate.tasks import TaskEval, check_data
from .export import save
from .export.engines import EngineFormat
from .export.layout import ExportError
from .io import check_output
from .methods import Recipe
from .models.load import estimate_bytes, load, resolve_local
from .progress import quiet

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
    calib: str = data.BUILTIN
    calib_field: str = "text"
    calib_windows: int = 64
    calib_length: int = 512
    batch_size: int = 1
    evaluation: EvalOptions | None = field(default_factory=EvalOptions)
    command: str | None = None
    engine: EngineFormat | None = None

    def __post_init__(self) -> None:
        if self.calib_windows < 1 or self.calib_length < 2:
            raise ValueError(f"need at least 1 calibration window of at least 2 tokens, got --calib-windows "
                             f"{self.calib_windows} --calib-length {self.calib_length}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"--batch-size must be a positive integer, got {self.batch_size}")
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


def run(job: Job, say: Callable[..., None] = _stderr) -> Result:
    """Run `job`; the output folder appears only when everything succeeded."""
    steps = job.recipe.build()
    if job.evaluation is not None and job.evaluation.task_eval is not None:
        check_data(job.evaluation.task_eval)  # a bad task name or missing data fails before the model loads
    if job.engine is not None:
        job.engine.check()
    if job.out is not None:
        # the pruned checkpoint is at most the dense one's size (fp32); a little room for the reports
        check_output(job.out, overwrite=job.overwrite, inputs=[p for p in [resolve_local(job.model)] if p],
                     need_bytes=int(1.05 * estimate_bytes(job.model)) + (1 << 20))
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    model, tok = load(job.model, with_tokenizer=True)
    seconds["load"] = time.perf_counter() - t0
    say(f"loaded {job.model} in {seconds['load']:.1f} s")
    calib = None
    if any(s.needs_calibration for s in steps):
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and job.calib_length > limit:
            raise ValueError(f"--calib-length {job.calib_length} is longer than the model's {limit} positions; "
                             f"use --calib-length {limit} or less")
        calib = data.calibration_windows(tok, job.calib, n=job.calib_windows, length=job.calib_length,
                                         field=job.calib_field)
    t0 = time.perf_counter()
    prune_(model, job.recipe, calibration=calib, batch_size=job.batch_size, progress=not quiet())
    seconds["prune"] = time.perf_counter() - t0
    for h in model.trimformer_history:
        say(f"{h['method']}: {h['seconds']:.1f} s")
    report = None
    if job.evaluation is not None:
        report = job.evaluation(model, tok, load(job.model))
        report["calibration"] = None if calib is None else {
            "source": job.calib, "windows": job.calib_windows, "window_tokens": job.calib_length}
    out = None
    if job.out is not None:
        meta = {"trimformer": __version__, "model": job.model, "command": job.command,
                "recipe": job.recipe.to_list(), "history": model.trimformer_history}
        files: dict[str, Any] = {"trimformer.json": meta}
        if report is not None:
            files.update({"report.json": report, "report.md": to_markdown(report)})
        if job.engine is None:
            out = save(model, job.out, tokenizer=tok, extra_files=files, overwrite=job.overwrite)
        else:
            try:
                out = job.engine.save(model, tok, job.out, overwrite=job.overwrite, extra_files=files)
            except ExportError as e:  # the cut is not lost: saved in our own format, and the reason is the error
                save(model, job.out, tokenizer=tok, extra_files=files, overwrite=job.overwrite)
                raise ExportError(f"{e} (saved {job.out}/ in trimformer's own format instead)") from e
    return Result(model, tok, report, out, seconds)
