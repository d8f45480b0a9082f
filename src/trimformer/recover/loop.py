"""The one training loop: recovery distillation and merge-aware token distillation both run on it.

    run = train_(objective, params, opt, schedule, callbacks)

A step is: the objective's loss for this step (its batch is a function of the step), backward, gradient
clipping, the optimizer step, then the learning rate of the next step. Everything else (masks, gradual
pruning, group lasso, freezing, the teacher cache, the time limit, checkpoints) is a `Callback` on the
loop: it starts, acts before and after each step, ends (also after an error), and hands a checkpoint the
state it needs, so that a resumed run repeats the same next step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import Config
from ..progress import bar

Objective = Callable[[int], tuple[torch.Tensor, dict[str, float]]]  # step -> (loss, its terms)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the step that produced it changed no weight."""


@dataclass
class Schedule(Config):
    """How long and how fast: `steps` of `batch_size`; `lr` (None: the trainer's default) after a linear
    warm-up over `warmup_steps`, then cosine decay to lr/10; AdamW `weight_decay`; gradients clipped to
    `max_grad_norm` (0: not clipped); `max_minutes`: stop after the step that reaches this much training
    time, the LR schedule then following whichever is further along, steps or time, so it still ends
    decayed; `seed`: the batch order and the random state."""

    steps: int = 300
    batch_size: int = 4
    lr: float | None = None
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_minutes: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in ("steps", "batch_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be a positive integer, got {getattr(self, f)!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0 (or None for the default), got {self.lr}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0 (or None: no time limit), got {self.max_minutes}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")

    def factor(self, step: int) -> float:
        """The learning rate at `step` as a share of `lr`: linear warm-up, then cosine from 1 to 0.1."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        frac = (step - self.warmup_steps) / max(self.steps - self.warmup_steps, 1)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(frac, 1.0)))


# The schedule's settings under their flat names, for the configs that hold a Schedule as `schedule`.
SCHEDULE_ALIASES = {name: f"schedule.{name}" for name in
                    ("steps", "batch_size", "lr", "warmup_steps", "weight_decay", "max_grad_norm", "max_minutes", "seed")}


class Callback:
    """A part of training that is not the step itself; every hook is optional. `name`: the key of its
    `state()` in a checkpoint (None: it keeps no state)."""

    name: str | None = None

    def start(self, run: Run) -> None:
        """Before the first step (after the optimizer exists; a resumed run's state is loaded after this)."""

    def before_step(self, run: Run) -> None:
        """Before step `run.step` (0-based) computes its loss; may `run.stop(reason)`."""

    def after_step(self, run: Run) -> None:
        """After the optimizer step; `run.step` counts it, the next step's learning rate is set."""

    def end(self, run: Run) -> None:
        """After the last step, or after an error (`run.error`)."""

    def state(self) -> Any:
        return None

    def load(self, state: Any) -> None:
        pass


@dataclass
class Run:
    """What the loop and its callbacks share."""

    params: dict[str, nn.Parameter]
    opt: torch.optim.Optimizer
    schedule: Schedule
    callbacks: list[Callback]
    step: int = 0  # steps done (a resumed run starts at its checkpoint's)
    resumed_from: int = 0
    losses: list[float] = field(default_factory=list)  # one per step done, resumed ones included
    parts: dict[str, float] = field(default_factory=dict)  # the last step's loss terms
    postfix: dict[str, str] = field(default_factory=dict)  # shown on the progress bar
    stopped: str | None = None  # why training ended before `schedule.steps`
    seconds: float = 0.0  # time in the loop
    error: BaseException | None = None

    def stop(self, reason: str) -> None:
        self.stopped = reason

    def set_lr(self, position: int) -> None:
        """Learning rate at `position` of the schedule (a time limit may put it ahead of the step)."""
        lr = self.opt.defaults["lr"] * self.schedule.factor(position)
        for g in self.opt.param_groups:
            g["lr"] = lr


def train_(objective: Objective, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, schedule: Schedule,
           callbacks: Sequence[Callback] = (), *, backward: Callable[[torch.Tensor], None] | None = None,
           mean: Callable[[torch.Tensor], torch.Tensor] | None = None, progress: bool = True,
           desc: str = "train") -> Run:
    """Train `params` with `opt` on `objective(step)` for `schedule.steps` steps; returns the finished Run.

    With several processes, each computes the loss of its share of the batch: `backward(loss)` replaces
    `loss.backward()` (accelerate's, which averages the gradients) and `mean(t)` averages over the processes,
    so the recorded loss (and its terms) is the whole batch's, and every process sees the same value."""
    run = Run(params, opt, schedule, list(callbacks))
    try:
        for cb in run.callbacks:
            cb.start(run)
        run.resumed_from = run.step
        run.set_lr(run.step)
        steps = bar(range(run.step, schedule.steps), desc=desc, unit="step", total=schedule.steps - run.step,
                    disable=not progress)
        t0 = time.perf_counter()
        for _ in steps:
            for cb in run.callbacks:
                cb.before_step(run)
                if run.stopped:  # (the callbacks after it do not see this step)
                    break
            if run.stopped:
                break
            loss, run.parts = objective(run.step)
            if mean is not None:  # (before the finiteness check: every process stops, or none)
                both = mean(torch.tensor([loss.item(), *run.parts.values()], dtype=torch.float64, device=loss.device))
                value, run.parts = both[0].item(), dict(zip(run.parts, both[1:].tolist()))
            else:
                value = loss.item()
            if not math.isfinite(value):
                terms = ", ".join(f"{k}={v:.4g}" for k, v in run.parts.items())
                raise NonFiniteLossError(f"loss became {value} at step {run.step + 1} ({terms}); "
                                         "training stopped before updating the weights")
            if backward is not None:
                backward(loss)
            else:
                loss.backward()
            if schedule.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(list(params.values()), schedule.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            run.step += 1
            run.set_lr(run.step)
            run.losses.append(value)
            for cb in run.callbacks:
                cb.after_step(run)
            steps.set_postfix(loss=f"{value:.4f}", **{k: f"{v:.4f}" for k, v in run.parts.items()}, **run.postfix)
        run.seconds = time.perf_counter() - t0
    except BaseException as e:
        run.error = e
        raise
    finally:
        for cb in reversed(run.callbacks):
            cb.end(run)
    return run


class TimeLimit(Callback):
    """Stop after the step that reaches `minutes` of training; until then the LR schedule follows
    whichever is further along, steps or time. `agree(t)`: the largest `t` over the processes (with
    several, each has its own clock: they must stop at the same step and keep the same learning rate)."""

    def __init__(self, minutes: float, agree: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.minutes, self.agree = minutes, agree
        self.t0: float | None = None  # (the clock starts at the first step: setup is not training time)
        self.first = 0

    def before_step(self, run: Run) -> None:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0, self.first = now, run.step
        used = (now - self.t0) / (60 * self.minutes)
        if self.agree is not None:
            used = self.agree(torch.tensor([used], dtype=torch.float64)).item()
        if used >= 1.0:
            run.stop(f"time limit of {self.minutes:g} min reached after {run.step - self.first} steps")
            return
        run.set_lr(max(run.step, int(used * run.schedule.steps)))


def loss_terms(loss: str, allowed: tuple[str, ...], example: str) -> tuple[str, ...]:
    """The '+'-joined terms of a loss spec ('cos+sim'), each one of `allowed`; a clear error otherwise."""
    terms = tuple(t.strip() for t in loss.split("+") if t.strip())
    bad = [t for t in terms if t not in allowed]
    if not terms or bad:
        raise ValueError(f"loss {loss!r}: use '+'-joined terms from {', '.join(allowed)} (e.g. '{example}')")
    return terms
