"""A grid of recipes: a base recipe, the axes to vary, and the options every cell shares.

    model: smollm2-135m
    recipe: [{method: wanda, sparsity: 0.5}]     # or a recipe file; optional when an axis sets `method`
    axes:                                        # the cross product; each value replaces the base's
      method: [wanda, sparsegpt]
      sparsity: [0.3, 0.5, 0.7]
    job: {calib_windows: 64}                     # any field of trimformer.pipeline.Job
    evaluation: {windows: 64, measure_speed: false}   # EvalOptions fields; false: no evaluation
    run: {workers: 2}                            # RunOptions

An axis is named after what it sets: `model`, `method` (one-step recipes), a field of `Job`
(`calib_windows`, ...) or a setting of the recipe's steps (`sparsity`, `allocation`, `target`, ...: every
step that has it). A value may be a mapping of several such settings (`{method: width, target: params=0.8}`,
with an optional `name` for the cell's name); `null` leaves the setting at its default (for `allocation`:
none). A cell whose settings do not make a valid recipe is reported as failed; the others run.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from ..config import Config, coerce_fields
from ..methods import Recipe
from ..pipeline import EvalOptions, Job

__all__ = ["Cell", "Grid", "RunOptions", "JOB_FIELDS"]

# Job fields a grid sets (in `job:` or as an axis); the others belong to the sweep itself.
JOB_FIELDS = [f.name for f in dataclasses.fields(Job)
              if f.name not in ("model", "recipe", "out", "overwrite", "evaluation", "command")]
EVAL_FIELDS = [f.name for f in dataclasses.fields(EvalOptions)]
TOP_KEYS = ("model", "recipe", "axes", "job", "evaluation", "run", "out")


@dataclass
class RunOptions(Config):
    """How cells run: `workers` at a time in local processes (0: one after another in this process), each
    with `cpus` threads (default: the machine's cores / workers); under Ray each cell is a task asking for
    `cpus`, `gpus` and `memory_gb`. `save_models`: keep each cell's pruned checkpoint (models/CELL/);
    `x`: the cost axis of the frontier."""

    name: ClassVar[str] = "run"
    workers: int = 1
    cpus: int | None = None
    gpus: float = 0.0
    memory_gb: float | None = None
    save_models: bool = False
    x: Literal["nonzeros", "params", "flops", "latency"] = "nonzeros"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.workers < 0:
            raise ValueError(f"run.workers must be >= 0 (0: cells run in this process), got {self.workers}")
        if self.cpus is not None and self.cpus < 1:
            raise ValueError(f"run.cpus must be >= 1, got {self.cpus}")
        if self.gpus < 0 or (self.memory_gb is not None and self.memory_gb <= 0):
            raise ValueError(f"run.gpus must be >= 0 and run.memory_gb > 0, got {self.gpus} and {self.memory_gb}")


@dataclass
class Cell:
    """One recipe of the grid. `error`: why it cannot run (found before any work), else None."""

    name: str
    axes: dict[str, Any]  # axis -> the value this cell takes (for the summary table)
    model: str
    recipe: list[dict[str, Any]]  # steps, as in a recipe file
    job: dict[str, Any]
    evaluation: dict[str, Any] | None
    error: str | None = None

    def spec(self) -> dict[str, Any]:
        """What the cell computes; a finished cell with the same spec is not run again."""
        return json.loads(json.dumps({"model": self.model, "recipe": self.recipe, "job": self.job,
                                      "evaluation": self.evaluation}, default=str))


@dataclass
class Grid:
    model: str | None
    recipe: list[dict[str, Any]]
    axes: dict[str, list[Any]]
    job: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = field(default_factory=dict)
    run: RunOptions = field(default_factory=RunOptions)
    out: str | None = None
    source: str | None = None  # the grid file

    @classmethod
    def from_file(cls, path: str | Path) -> Grid:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"grid {str(p)!r} does not exist")
        if p.suffix not in (".yaml", ".yml", ".json"):
            raise ValueError(f"grid {str(p)!r}: use a .yaml or .json file")
        try:
            obj = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
            raise ValueError(f"grid {where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        except UnicodeDecodeError:
            raise ValueError(f"grid {str(p)!r} is not text (UTF-8)") from None
        try:
            return cls.from_obj(obj, base=p.parent, source=str(p))
        except (ValueError, KeyError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise ValueError(f"grid {p}: {msg}") from None

    @classmethod
    def from_obj(cls, obj: Any, base: Path | None = None, source: str | None = None) -> Grid:
        if not isinstance(obj, dict):
            raise ValueError("a grid is a mapping with 'model', 'recipe' and 'axes' (see `trimformer sweep --help`)")
        _known("grid key", obj, TOP_KEYS)
        recipe = obj.get("recipe")
        if isinstance(recipe, str):  # a recipe file, relative to the grid
            rp = Path(recipe) if base is None or Path(recipe).is_absolute() else base / recipe
            recipe = Recipe.from_file(rp).to_list()
        elif isinstance(recipe, dict):
            recipe = recipe.get("steps", [recipe])
        if not isinstance(recipe or [], list) or not all(isinstance(s, dict) and "method" in s for s in recipe or []):
            raise ValueError("recipe: expected a list of steps {method: NAME, setting: value, ...}")
        axes = obj.get("axes") or {}
        if not isinstance(axes, dict):
            raise ValueError("axes: expected a mapping of axis -> list of values, e.g. {sparsity: [0.3, 0.5]}")
        for k, v in axes.items():
            if not isinstance(v, list) or not v:
                raise ValueError(f"axis {k!r}: expected a non-empty list of values, got {v!r}")
        job = obj.get("job") or {}
        if not isinstance(job, dict):
            raise ValueError(f"job: expected a mapping of Job fields ({', '.join(JOB_FIELDS)})")
        _known("job field", job, JOB_FIELDS)
        coerce_fields(Job, job)  # (types; each cell's Job checks its values)
        ev = obj.get("evaluation", {})
        if ev is not False and ev is not None:
            if not isinstance(ev, dict):
                raise ValueError(f"evaluation: expected a mapping of {', '.join(EVAL_FIELDS)}, or false")
            _known("evaluation field", ev, EVAL_FIELDS)
            ev = coerce_fields(EvalOptions, ev)
            EvalOptions(**ev)  # its own range checks
        run_opts = obj.get("run") or {}
        if not isinstance(run_opts, dict):
            raise ValueError("run: expected a mapping, e.g. {workers: 2, cpus: 1}")
        model = obj.get("model")
        grid = cls(model=None if model is None else str(model), recipe=[dict(s) for s in recipe or []], axes=axes, job=job,
                   evaluation=None if ev is False or ev is None else ev,
                   run=RunOptions(**coerce_fields(RunOptions, run_opts)), out=obj.get("out"), source=source)
        grid.check()
        return grid

    def with_run(self, **options: Any) -> Grid:
        """The grid with some run options replaced (None: keep the grid's)."""
        given = {k: v for k, v in options.items() if v is not None}
        merged = {**dataclasses.asdict(self.run), **given}
        return dataclasses.replace(self, run=RunOptions(**coerce_fields(RunOptions, merged)))

    def check(self) -> None:
        """Errors that concern the whole grid, not one cell."""
        if self.model is None and "model" not in self.axes:
            raise ValueError("no model: give 'model: NAME' (or an axis 'model: [...]')")
        if not self.recipe and not any("method" in _settings(k, v) for k, vs in self.axes.items() for v in vs):
            raise ValueError("no recipe: give 'recipe: [{method: NAME, ...}]' or an axis 'method: [...]'")
        if self.evaluation is None and not self.run.save_models:
            raise ValueError("evaluation: false keeps nothing of a cell: set run.save_models: true, or evaluate")
        cells = self.cells()
        if all(c.error for c in cells):
            raise ValueError(f"no cell of the grid is valid; the first: {cells[0].name}: {cells[0].error}")

    def cells(self) -> list[Cell]:
        """The cross product of the axes, in their order (the last axis varies fastest)."""
        names = list(self.axes)
        cells = []
        for values in itertools.product(*(self.axes[n] for n in names)) if names else [()]:
            cells.append(self._cell(dict(zip(names, values))))
        seen: dict[str, int] = {}
        for c in cells:  # sanitising may map two cells to one name
            seen[c.name] = seen.get(c.name, 0) + 1
        for c in cells:
            if seen[c.name] > 1:
                c.name = f"{c.name[:90]}-{_digest(c.axes)}"
        return cells

    def _cell(self, picked: dict[str, Any]) -> Cell:
        model, job = self.model, dict(self.job)
        method, recipe_settings = None, {}
        for axis, value in picked.items():
            for key, v in _settings(axis, value).items():
                if key == "model":
                    model = str(v)
                elif key == "method":
                    method = v
                elif key in JOB_FIELDS:
                    job[key] = v
                else:
                    recipe_settings[key] = v
        name = _name(picked)
        steps = [dict(s) for s in self.recipe]
        cell = Cell(name, {a: _label(a, v) for a, v in picked.items()}, str(model), steps, job, self.evaluation)
        try:
            if method is not None:
                if len(steps) > 1:
                    raise ValueError(f"an axis sets 'method', but the recipe has {len(steps)} steps: vary the "
                                     "method of a one-step recipe, or give whole recipes as mapping values")
                steps = [{**(steps[0] if steps else {}), "method": method}]
            if len(steps) == 1:  # one step: its settings directly (so `allocation` and `null` work)
                steps = [_without_none({**steps[0], **recipe_settings})]
                recipe = Recipe.from_obj(steps)
            else:
                recipe = Recipe.from_obj(steps).override(_without_none(recipe_settings))
            cell.recipe = [{"method": s.method, **s.settings} for s in recipe.steps]
            Job(model=cell.model, recipe=recipe, evaluation=None, **job)  # its own checks
        except (ValueError, KeyError, TypeError) as e:
            cell.error = one_line(e)
        return cell


def one_line(e: BaseException) -> str:
    """An error as one line: its type unless it is a plain user error, and the first line of its message."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = (str(msg).strip().splitlines() or [""])[0]
    kind = type(e).__name__
    return msg if kind in ("ValueError", "KeyError", "ConfigError", "FileNotFoundError") and msg else f"{kind}: {msg}"


def _known(what: str, given: dict, known: list[str] | tuple[str, ...]) -> None:
    for k in given:
        if k not in known:
            close = difflib.get_close_matches(str(k), known, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown {what} {k!r}.{hint} Known: {', '.join(known)}")


def _settings(axis: str, value: Any) -> dict[str, Any]:
    """What an axis value sets: a mapping sets its keys (`name` only names the cell), a scalar the axis."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "name"}
    return {axis: value}


def _without_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _label(axis: str, value: Any) -> str:
    if isinstance(value, dict):
        return str(value["name"]) if "name" in value else "+".join(f"{k}={_label(k, v)}" for k, v in value.items())
    if value is None:
        return "none"
    if axis == "model":
        return Path(str(value)).name or str(value)
    if isinstance(value, list):
        return "+".join(map(str, value))
    return str(value)


def _name(picked: dict[str, Any]) -> str:
    """A folder name: 'method=wanda,sparsity=0.5'; characters outside [A-Za-z0-9._=,+-] become '_'."""
    if not picked:
        return "base"
    raw = ",".join(f"{a}={_label(a, v)}" for a, v in picked.items())
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", raw).lstrip(".")
    return safe if len(safe) <= 100 else f"{safe[:90]}-{_digest(picked)}"


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]
