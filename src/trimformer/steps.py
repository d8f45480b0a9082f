"""What `prune_` accepts: an offline step (a registered method config) and the context it runs in.

    class MyMethod(Config):            # a @dataclass registered in a family's registry
        needs_calibration = True       # (a class variable, or a property when it depends on settings)
        needs_dense = False            # True: the run keeps a copy of the model from before the recipe
        streams = False                # optional; True: runs on a model streamed from disk (models/offload.py)
        data_parallel = False          # optional; True: sums its statistics across processes (parallel.py)
        def apply_(self, anatomy, run: StepContext) -> dict: ...

`StepContext` carries everything that is not a setting of the method: the calibration windows, which
modules may be touched (`filter_fn`), the batch size, progress bars and, for steps that ask for it, the
dense model. A method reads what it needs from it and never from globals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from .models import Anatomy

FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class StepContext:
    """calibration: token windows (n, length), images (n, 3, H, W) for a ViT, or None. filter_fn(module, name) -> bool: only modules it accepts
    are pruned (each family says what a module is for it: projections for weights, a block's output projections
    for width, blocks for depth). dense: the model as it was before the recipe's first step (set by the pipeline
    for steps with `needs_dense`)."""

    calibration: torch.Tensor | None = None
    filter_fn: FilterFn | None = None
    batch_size: int = 1
    progress: bool = True
    dense: nn.Module | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise ValueError("filter_fn must be a function (module, name) -> bool")

    def require_calibration(self, what: str) -> torch.Tensor:
        """The calibration windows, or a clear error naming the step that needs them."""
        if self.calibration is None:
            raise ValueError(f"{what} needs calibration data (token ids of shape (n, length); images (n, 3, H, W) "
                             "for a ViT)")
        return self.calibration

    def accepts(self, module: nn.Module, name: str) -> bool:
        return self.filter_fn is None or bool(self.filter_fn(module, name))


@runtime_checkable
class OfflineStep(Protocol):
    """An offline cut (or a recovery step) that `prune_` runs in place on a model."""

    name: ClassVar[str]

    @property
    def needs_calibration(self) -> bool: ...

    @property
    def needs_dense(self) -> bool: ...

    def apply_(self, anatomy: Anatomy, run: StepContext) -> dict[str, Any]: ...


def check_supported(steps: list[Any], *, streamed: bool = False, processes: int = 1) -> None:
    """A clear error for a step that cannot run on a streamed model, or with several processes, before any work.

    A step streams when it touches weights only inside forwards or `models.offload.onload(block.module, ...)`
    (calibrate.blocks does this for each block it yields); it runs data-parallel when every statistic it
    decides from is summed across processes (parallel.all_reduce_ / reduce_sum) and it calibrates through
    calibrate.blocks (which shares the windows out)."""
    for step in steps:
        name = getattr(type(step), "name", type(step).__name__)
        if streamed and not getattr(step, "streams", False):
            raise ValueError(f"method {name!r} does not run on a model streamed from disk yet (weight methods do): "
                             "use --offload none (the estimate above says how much memory that needs)")
        if processes > 1 and not getattr(step, "data_parallel", False):
            raise ValueError(f"method {name!r} does not calibrate data-parallel yet (weight methods do): run it in "
                             "one process, without torchrun")


def check_step(step: Any) -> OfflineStep:
    """`step` if it implements OfflineStep, else a TypeError that says what is missing."""
    missing = [a for a in ("name", "needs_calibration", "needs_dense", "apply_") if not hasattr(step, a)]
    if missing:
        raise TypeError(f"{type(step).__name__} is not an offline step (missing {', '.join(missing)}); build one "
                        "with trimformer.build(name, settings) or pass a Recipe")
    return step
