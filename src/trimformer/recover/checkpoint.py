"""Training checkpoints: one folder per step, written atomically; the newest complete one is resumed."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_dir

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
