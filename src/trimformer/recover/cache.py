"""Teacher targets cached on disk: computed once for every training window, reused by every epoch and run.

What is stored is what the loss needs from the teacher, per window, as float32 safetensors:
- 'out': the teacher's *last hidden states* (n, T, H) when the head loss is fused (loss_chunk > 0). The
  loss recomputes the logits from them exactly through the teacher's head, a chunk at a time, so nothing
  is lost, and the file is vocab/H (85x for SmolLM2) smaller than full log-probs; with loss_chunk=0 it holds
  the full logits (n, T, V) instead (big: 4 * V bytes per token);
- 'block.j': outputs of the teacher blocks the hidden term maps to (n, T, H), when the loss has 'hidden'.
The header records a fingerprint of the data, the teacher and these choices; a file made for anything
else is refused, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..progress import bar
from .loop import Callback, Run
from .loss import Distiller


def fingerprint(data: torch.Tensor, teacher: nn.Module, distill: Distiller) -> str:
    h = hashlib.sha256()
    h.update(data.cpu().numpy().tobytes())
    h.update(json.dumps([list(data.shape), distill.fused, sorted(set(distill.mapping)), distill.logits]).encode())
    with torch.no_grad():
        for name, p in teacher.named_parameters():  # shapes and a checksum of every tensor
            h.update(f"{name}{tuple(p.shape)}{p.double().sum().item():.10e}".encode())
    return h.hexdigest()


class TeacherCache:
    """Opened read-only and memory-mapped; `get(rows)` returns the targets of those windows, batched."""

    def __init__(self, path: str | os.PathLike, expected: str):
        from safetensors import safe_open

        self.path = Path(path)
        self.file = safe_open(str(self.path), framework="pt")
        found = (self.file.metadata() or {}).get("fingerprint")
        if found != expected:
            raise ValueError(
                f"teacher cache {str(self.path)!r} was made for other data, another teacher or other loss "
                "settings; delete it or give another path"
            )
        self.keys = list(self.file.keys())

    def get(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for k in self.keys:
            sl = self.file.get_slice(k)
            out[k] = torch.cat([sl[int(r):int(r) + 1] for r in rows])  # (B, T, ...)
        return out


@torch.no_grad()
def build(path: str | os.PathLike, distill: Distiller, teacher: nn.Module, data: torch.Tensor, *,
          batch_size: int = 4, progress: bool = True) -> TeacherCache:
    """Open the cache at `path`, computing it first (one teacher pass over `data` (n, T)) if absent."""
    from safetensors.torch import save_file

    p = Path(path)
    key = fingerprint(data, teacher, distill)
    if not p.exists():
        parts: dict[str, list[torch.Tensor]] = {}
        for i in bar(range(0, data.shape[0], batch_size), desc="teacher cache", unit="batch", disable=not progress):
            for k, v in distill.teacher_targets(teacher, data[i:i + batch_size]).items():
                parts.setdefault(k, []).append(v.float().cpu())
        tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}  # each (n, T, ...)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"fingerprint": key, "windows": str(data.shape[0])})
        os.replace(tmp, p)  # a cache is complete or absent
    return TeacherCache(p, key)


class TeacherTargets(Callback):
    """The cache as a part of training: opened (computed first, by process 0 alone) when training starts;
    `get(rows)` then gives the objective the teacher's targets of those windows."""

    def __init__(self, path: str | os.PathLike, distill: Distiller, teacher: nn.Module, data: torch.Tensor, *,
                 batch_size: int, rank: int = 0, barrier: Callable[[], None] | None = None, progress: bool = True):
        self.path, self.distill, self.teacher, self.data = path, distill, teacher, data
        self.batch_size, self.rank, self.barrier, self.progress = batch_size, rank, barrier, progress
        self.cache: TeacherCache | None = None

    def start(self, run: Run) -> None:
        if self.rank == 0:
            self.cache = build(self.path, self.distill, self.teacher, self.data, batch_size=self.batch_size,
                               progress=self.progress)
        if self.barrier is not None:
            self.barrier()
        if self.rank != 0:  # (the file exists now: opened, not computed)
            self.cache = build(self.path, self.distill, self.teacher, self.data, progress=False)

    def get(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cache is None:
            raise RuntimeError("the teacher cache is opened when training starts")
        return self.cache.get(rows)
