"""Training checkpoints: one folder per step, written atomically; the newest complete one is resumed.

A checkpoint holds everything the next step depends on: the trained tensors, the optimizer, the random
state, the losses so far, the state of every callback that keeps one (masks, frozen blocks) and the step
(the learning rate and the batch order are functions of the step), so a resumed run repeats the same next
step. Settings that change what is computed must match the interrupted run's.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_dir
from .loop import Callback, Run

STATE = "state.pt"


def steps_in(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `folder` as (step, path), oldest first (temp folders are never matched)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and (p / STATE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest(folder: str | os.PathLike) -> Path | None:
    found = steps_in(folder)
    return found[-1][1] if found else None


def save(folder: str | os.PathLike, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as `folder/step-NNNNNN/state.pt` (temp folder, then rename); keep the newest `keep`."""
    out = Path(folder) / f"step-{step:06d}"
    with atomic_dir(out, overwrite=True) as tmp:
        torch.save(state, tmp / STATE)
    for _, old in steps_in(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return out


def load(path: str | os.PathLike) -> dict[str, Any]:
    return torch.load(Path(path) / STATE, map_location="cpu", weights_only=True)


def resume_hint(last: Path | None) -> str:
    """For an error message: where a failed run can resume from."""
    if last is None:
        return "no checkpoint was written yet (set checkpoint_dir to keep one)"
    return f"the last good checkpoint is {last}; resume from it after lowering lr"


class Checkpoints(Callback):
    """Resume from the newest checkpoint in `folder` when training starts (if `resume`), save one every
    `every` steps (process 0; the others wait at `barrier`), keep the newest `keep`. `settings`: what must
    be equal to resume (a mapping of names to JSON-able values)."""

    def __init__(self, folder: str, every: int, keep: int, resume: bool, settings: dict[str, Any], *,
                 rank: int = 0, barrier: Callable[[], None] | None = None):
        self.folder, self.every, self.keep, self.resume = folder, every, keep, resume
        self.settings, self.rank, self.barrier = settings, rank, barrier
        self.last: Path | None = None  # the newest complete checkpoint, resumed or written

    def start(self, run: Run) -> None:
        found = latest(self.folder) if self.resume else None
        if found is not None:
            self._restore(found, run)
            self.last = found

    def after_step(self, run: Run) -> None:
        if run.step % self.every:
            return
        if self.rank == 0:
            self.last = save(self.folder, run.step, self._state(run), self.keep)
        if self.barrier is not None:
            self.barrier()

    def _state(self, run: Run) -> dict[str, Any]:
        return {
            "step": run.step,
            "settings": self.settings,
            "params": {n: p.detach().cpu().clone() for n, p in run.params.items()},
            "optimizer": run.opt.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "losses": list(run.losses),
            **{cb.name: cb.state() for cb in run.callbacks if cb.name},
        }

    @torch.no_grad()
    def _restore(self, path: Path, run: Run) -> None:
        state = load(path)
        diff = {k: (state["settings"].get(k), v) for k, v in self.settings.items() if state["settings"].get(k) != v}
        if diff:
            what = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"checkpoint {path} was made with other settings ({what}); "
                             "use the same settings, another checkpoint folder, or resume=False")
        missing = set(run.params) ^ set(state["params"])
        if missing:
            raise ValueError(f"checkpoint {path} does not match this model (parameters differ: {sorted(missing)[:3]} ...)")
        for n, p in run.params.items():
            p.copy_(state["params"][n])
        run.opt.load_state_dict(state["optimizer"])
        for cb in run.callbacks:
            if cb.name and cb.name in state:
                cb.load(state[cb.name])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        run.step, run.losses = int(state["step"]), list(state["losses"])
