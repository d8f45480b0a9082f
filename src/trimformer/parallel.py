"""Data-parallel calibration over torch.distributed: each process takes a share of the windows, statistics are
summed across processes, and process 0 writes.

    torchrun --nproc-per-node 2 -m trimformer prune --model M --method sparsegpt --out pruned/

`init()` joins the process group torchrun describes (gloo on CPU, NCCL on CUDA); without one every function
here is a no-op for a single process, so calibration code calls them unconditionally:

    ids = windows[parallel.share(len(windows))]          # this process' windows
    parallel.all_reduce_(H, sq)                          # sum the statistics of every process, in place

A method that collects its own statistics (a structure criterion, a search score) calls `all_reduce_` (or
`reduce_sum` on a dict of them) once its share of the windows is done and before it decides anything: every
process then holds the same numbers and makes the same cut.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_reduce_", "barrier", "broadcast_object", "init", "is_main", "rank", "reduce_sum", "share", "size"]


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: str | torch.device = "auto") -> torch.device:
    """Join the process group of a `torchrun` launch (WORLD_SIZE > 1 in the environment) and return this
    process' device: cuda:LOCAL_RANK on GPUs (NCCL), else cpu (gloo). Without torchrun: `device` resolved."""
    device = torch.device("cuda" if str(device) == "auto" and torch.cuda.is_available() else
                          "cpu" if str(device) == "auto" else device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share(n: int) -> slice:
    """This process' contiguous share of n calibration windows (process r of W: [r*n//W, (r+1)*n//W))."""
    r, w = rank(), size()
    if n < w:
        raise ValueError(f"{n} calibration window(s) cannot be shared by {w} processes: use --calib-windows {w} "
                         "or more, or fewer processes")
    return slice(r * n // w, (r + 1) * n // w)


def all_reduce_(*tensors: torch.Tensor | None) -> None:
    """Sum each tensor over every process, in place (None entries are skipped)."""
    if not active():
        return
    for t in tensors:
        if t is not None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def reduce_sum(obj: Any) -> Any:
    """Sum a statistic over every process: a tensor (in place), a number, or a dict / list / tuple of them."""
    if not active():
        return obj
    if isinstance(obj, torch.Tensor):
        dist.all_reduce(obj, op=dist.ReduceOp.SUM)
        return obj
    if isinstance(obj, dict):
        return {k: reduce_sum(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(reduce_sum(v) for v in obj)
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        t = torch.tensor([obj], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return type(obj)(t.item())
    raise TypeError(f"reduce_sum cannot sum a {type(obj).__name__}")


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Process 0's `obj` on every process (a path, a decision)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
