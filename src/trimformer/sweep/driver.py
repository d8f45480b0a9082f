"""A sweep end to end: every cell of a grid pruned and evaluated, gathered into one frontier report.

    OUT/grid.json          the grid as run, and its cells
    OUT/cells/CELL/        report.json, report.md, trimformer.json, cell.json (written at once when the cell ends)
    OUT/models/CELL/       the pruned checkpoint (run.save_models only)
    OUT/report/            index.md, frontier.png, per-layer plots (`trimformer report` over the finished cells)
    OUT/summary.json, .md  every cell: its settings, status, metrics, whether it is on the frontier, its error

A cell is finished when its folder exists with the same settings (cell.json); running the same grid again
runs only the cells that are not (failed, new, or whose settings changed).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..config import settings
from ..evaluate import to_markdown
from ..io import atomic_dir, atomic_file, check_output
from ..models.load import resolve_local
from ..report import write_report
from ..report.plots import COST_AXES
from .execute import Result, Runner, check_ray, default_threads, model_type, run_cell, run_local, run_ray
from .grid import Cell, Grid

SUMMARY_SCHEMA = "trimformer.sweep/1"


def _stderr(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def run(grid: Grid, out: str | Path | None = None, *, ray: str | None = None, trust_remote_code: bool = False,
        say: Callable[..., None] = _stderr, runner: Runner = run_cell) -> dict:
    """Run the cells of `grid` not finished in `out` (default: the grid's `out`); returns the summary.

    `ray`: None runs cells in local processes (`grid.run.workers` at a time); 'auto' or a cluster address runs
    each as a Ray task. `runner(cell, threads, save_to, trust_remote_code) -> result`: what a cell does
    (default `run_cell`: `pipeline.run`); a module-level function, so that other processes can import it."""
    out = folder(grid, out)
    if ray:
        check_ray(ray)
    cells = grid.cells()
    inputs = [p for c in cells for p in [resolve_local(c.model)] if p]
    check_output(out, overwrite=True, inputs=inputs)
    opts = grid.run
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out):
        atomic_file(out / "grid.json", json.dumps(
            {"source": grid.source, "axes": grid.axes, "run": settings(opts),
             "cells": [{"name": c.name, "axes": c.axes, **c.spec(), "invalid": c.error} for c in cells]},
            indent=2, default=str))
        rows = {c.name: _row(c) for c in cells}
        todo = []
        for c, status in plan(grid, out):
            if status == "invalid":
                rows[c.name].update(status="failed", error=f"invalid: {c.error}")
            elif status == "finished":
                rows[c.name].update(status="skipped", **_metrics(out / "cells" / c.name, opts.x))
            else:
                todo.append(c)
        n_skip = sum(r["status"] == "skipped" for r in rows.values())
        say(f"sweep {out}: {len(cells)} cells, {len(todo)} to run, {n_skip} finished earlier (skipped), "
            f"{sum(bool(c.error) for c in cells)} invalid")
        for c in cells:
            if c.error:
                say(f"  {c.name}: failed (invalid): {c.error}")
        threads = opts.cpus or (1 if ray else default_threads(opts.workers))
        jobs = [(c.name, ({"name": c.name, **c.spec()}, threads,
                          str(out / "models" / c.name) if opts.save_models else None, trust_remote_code))
                for c in todo]
        by_name = {c.name: c for c in cells}
        count = [n_skip]

        def done(name: str, result: Result) -> None:
            count[0] += 1
            row = rows[name]
            row["seconds"] = round(result.get("seconds", 0.0), 2)
            if "error" in result:
                row.update(status="failed", error=result["error"], traceback=result.get("traceback"))
                say(f"[{count[0]}/{len(cells)}] {name}: failed: {result['error']}")
                return
            _write_cell(out, by_name[name], result, opts.save_models)
            row.update(status="done", **_metrics(out / "cells" / name, opts.x))
            kl = row.get("kl")
            say(f"[{count[0]}/{len(cells)}] {name}: done in {result['seconds']:.1f} s"
                + (f" (KL {kl:.4g})" if kl is not None else ""))

        where = f"local processes, {opts.workers} at a time, {threads} threads each" if opts.workers else \
            f"this process, {threads} threads"
        t0 = time.perf_counter()
        try:
            if todo and ray:
                res = {"num_cpus": opts.cpus or 1, "num_gpus": opts.gpus}
                if opts.memory_gb:
                    res["memory"] = int(opts.memory_gb * 2**30)
                where = run_ray(jobs, ray, res, done, runner)
            elif todo:
                run_local(jobs, opts.workers, done, runner, {t for c in todo if (t := model_type(c.model))})
        finally:  # (also when interrupted: what finished is summarised and kept)
            summary = _summarise(out, grid, list(rows.values()), where, time.perf_counter() - t0)
    return summary


def folder(grid: Grid, out: str | Path | None = None) -> Path:
    """The sweep folder: `out`, else the grid's `out`, else GRID-sweep/ (for grid.yaml) in this folder."""
    return Path(out or grid.out or (Path(grid.source).stem + "-sweep" if grid.source else "sweep"))


def plan(grid: Grid, out: str | Path) -> list[tuple[Cell, str]]:
    """Each cell with what a run into `out` does with it: 'invalid', 'finished' (skipped) or 'run'."""
    return [(c, "invalid" if c.error else "finished" if _finished(Path(out), c, grid.run.save_models) else "run")
            for c in grid.cells()]


def _row(c: Cell) -> dict[str, Any]:
    return {"name": c.name, "axes": c.axes, "status": "not run", "error": None}


def _finished(out: Path, c: Cell, save_models: bool) -> bool:
    p = out / "cells" / c.name / "cell.json"
    if not p.is_file():
        return False
    try:
        same = json.loads(p.read_text()).get("spec") == c.spec()
    except (OSError, json.JSONDecodeError):
        return False
    return same and (not save_models or (out / "models" / c.name / "config.json").is_file())


def _write_cell(out: Path, c: Cell, result: Result, save_models: bool) -> None:
    report = result.get("report")
    with atomic_dir(out / "cells" / c.name, overwrite=True) as tmp:
        if report is not None:
            (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str))
            (tmp / "report.md").write_text(to_markdown(report))
        (tmp / "trimformer.json").write_text(json.dumps(result["meta"], indent=2, default=str))
        cell = {"name": c.name, "axes": c.axes, "spec": c.spec(), "seconds": result["seconds"],
                "model": f"models/{c.name}" if save_models else None}
        (tmp / "cell.json").write_text(json.dumps(cell, indent=2))


def _metrics(folder: Path, x: str) -> dict[str, Any]:
    p = folder / "report.json"
    if not p.is_file():
        return {}
    r = json.loads(p.read_text())
    q, s = r.get("quality", {}), r.get("speed", {})
    try:
        cost = COST_AXES[x][1](r)
    except (KeyError, TypeError, ZeroDivisionError):
        cost = None
    loss = q.get("kl", None if "cos_mean" not in q else 1 - q["cos_mean"])
    return {"ppl": q.get("ppl"), "kl": q.get("kl"), "top1_agree": q.get("top1_agree"), "cos_mean": q.get("cos_mean"),
            "loss": loss, "cost": cost, "flops_ratio": r.get("cost", {}).get("flops_ratio"),
            "prefill_ratio": s.get("prefill_ratio"), "peak_rss_bytes": r.get("memory", {}).get("peak_rss_bytes")}


def frontier(rows: list[dict[str, Any]]) -> set[str]:
    """Names of the rows no other row beats on both cost and loss (lower is better for both)."""
    pts = [(r["cost"], r["loss"], r["name"]) for r in rows if r.get("cost") is not None and r.get("loss") is not None]
    return {n for c, loss, n in pts
            if not any(c2 <= c and l2 <= loss and (c2 < c or l2 < loss) for c2, l2, _ in pts)}


def _summarise(out: Path, grid: Grid, rows: list[dict[str, Any]], where: str, seconds: float) -> dict:
    ok = [r for r in rows if r["status"] in ("done", "skipped")]
    best = frontier(ok)
    for r in ok:
        r["frontier"] = r["name"] in best
    reported = [r["name"] for r in ok if (out / "cells" / r["name"] / "report.json").is_file()]
    if reported and not _report_current(out, reported, grid.run.x, rows):
        write_report([str(out / "cells" / n) for n in reported], out / "report", x=grid.run.x, overwrite=True)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed", "not run")}
    summary = {"schema": SUMMARY_SCHEMA, "grid": grid.source, "ran_on": where, "seconds": round(seconds, 2),
               "x": grid.run.x, "counts": counts, "report": "report/index.md" if reported else None, "reported": reported,
               "cells": rows}
    atomic_file(out / "summary.json", json.dumps(summary, indent=2, default=str))
    atomic_file(out / "summary.md", summary_markdown(summary))
    return summary


def _report_current(out: Path, reported: list[str], x: str, rows: list[dict[str, Any]]) -> bool:
    """The report already shows exactly these cells and no cell ran since it was written: keep it."""
    if any(r["status"] == "done" for r in rows):
        return False
    try:
        last = json.loads((out / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return last.get("reported") == reported and last.get("x") == x and (out / "report" / "index.md").is_file()


def summary_markdown(summary: dict) -> str:
    c = summary["counts"]
    lines = [f"# trimformer sweep: {summary['grid'] or 'grid'}", "",
             f"{c['done']} cells ran, {c['skipped']} finished earlier, {c['failed']} failed, {c['not run']} not run; "
             f"{summary['ran_on']}, {summary['seconds']:.1f} s.", ""]
    if summary["report"]:
        lines += ["Frontier report: [report/index.md](report/index.md)", "", "![frontier](report/frontier.png)", ""]
    axes = list(summary["cells"][0]["axes"]) if summary["cells"] else []
    x = COST_AXES[summary["x"]][0]

    def f(v, spec="{:.4g}"):
        return "–" if v is None else spec.format(v)

    lines += [f"Cost: {x}. Frontier: no other cell is both cheaper and closer to the dense model.", "",
              "| " + " | ".join([*axes, "status", "KL", "ppl", "top-1", "cost", "frontier", "s", "error"]) + " |",
              "|" + " --- |" * (len(axes) + 8)]
    for r in summary["cells"]:
        cells = [str(r["axes"][a]) for a in axes]
        cells += [r["status"], f(r.get("kl")), f(r.get("ppl")), f(r.get("top1_agree"), "{:.1%}"), f(r.get("cost"), "{:.3f}"),
                  "yes" if r.get("frontier") else "", f(r.get("seconds"), "{:.1f}"),
                  (r.get("error") or "").replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """One sweep at a time writes into `out`."""
    try:
        import fcntl
    except ImportError:  # (not on Windows: no lock)
        yield
        return
    with open(out / ".sweep.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another `trimformer sweep` is writing to {str(out)!r}; wait for it to finish, or "
                             "choose another --out") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
