"""The one training loop (recover/loop.py) on a least-squares toy: hooks, schedule, stop, errors, resume."""

from __future__ import annotations

import math

import pytest
import torch

from trimformer.recover import loop as loop_mod
from trimformer.recover.checkpoint import Checkpoints
from trimformer.recover.loop import Callback, NonFiniteLossError, Run, Schedule, TimeLimit, train_


def problem(seed: int = 0):
    """Fit w (4,) to y = X w*: params, AdamW, and an objective whose batch is a function of the step."""
    g = torch.Generator().manual_seed(seed)
    X, w_true = torch.randn(32, 4, generator=g), torch.randn(4, generator=g)
    y = X @ w_true
    w = torch.nn.Parameter(torch.zeros(4))

    def objective(step: int):
        rows = torch.arange(8) + 8 * (step % 4)  # (B,)
        loss = (X[rows] @ w - y[rows]).pow(2).mean()
        return loss, {"mse": loss.item()}

    return {"w": w}, torch.optim.AdamW([w], lr=0.1), objective


class Recorder(Callback):
    """Records every hook with the step and learning rate it saw; keeps a counter as its checkpoint state."""

    name = "recorder"

    def __init__(self):
        self.events: list[tuple[str, int, float]] = []
        self.count = 0

    def start(self, run: Run) -> None:
        self.events.append(("start", run.step, run.opt.param_groups[0]["lr"]))

    def before_step(self, run: Run) -> None:
        self.events.append(("before", run.step, run.opt.param_groups[0]["lr"]))

    def after_step(self, run: Run) -> None:
        self.count += 1
        self.events.append(("after", run.step, run.opt.param_groups[0]["lr"]))

    def end(self, run: Run) -> None:
        self.events.append(("end", run.step, type(run.error).__name__ if run.error else ""))

    def state(self) -> int:
        return self.count

    def load(self, state: int) -> None:
        self.count = state


def test_hooks_come_in_order_and_the_schedule_sets_each_steps_lr():
    params, opt, objective = problem()
    sched = Schedule(steps=6, warmup_steps=2)
    rec = Recorder()
    run = train_(objective, params, opt, sched, [rec], progress=False)
    kinds = [e[0] for e in rec.events]
    assert kinds == ["start"] + ["before", "after"] * 6 + ["end"]
    before = [(s, lr) for k, s, lr in rec.events if k == "before"]
    assert [s for s, _ in before] == list(range(6))
    assert all(lr == 0.1 * sched.factor(s) for s, lr in before)  # warm-up 1/3, 2/3, then cosine to 0.01
    assert before[0][1] == pytest.approx(0.1 / 3) and sched.factor(6) == pytest.approx(0.1)
    assert run.step == 6 and len(run.losses) == 6 and run.losses[-1] < run.losses[0] and run.stopped is None
    assert run.parts == {"mse": run.losses[-1]}


def test_a_callback_stops_training_and_end_still_runs():
    class StopAtThree(Callback):
        def before_step(self, run):
            if run.step == 3:
                run.stop("enough")

    params, opt, objective = problem()
    rec = Recorder()
    run = train_(objective, params, opt, Schedule(steps=10), [StopAtThree(), rec], progress=False)
    assert run.step == 3 and run.stopped == "enough" and rec.events[-1] == ("end", 3, "")


def test_non_finite_loss_stops_before_updating_and_ends_the_callbacks():
    params, opt, objective = problem()

    def poisoned(step):
        loss, parts = objective(step)
        return (loss * float("nan"), parts) if step == 2 else (loss, parts)

    rec = Recorder()
    seen = {}

    class Snapshot(Callback):
        def after_step(self, run):
            seen[run.step] = params["w"].detach().clone()

    with pytest.raises(NonFiniteLossError, match="loss became nan at step 3 .*before updating the weights"):
        train_(poisoned, params, opt, Schedule(steps=5), [Snapshot(), rec], progress=False)
    assert torch.equal(params["w"], seen[2])  # the weights of the last good step
    assert rec.events[-1] == ("end", 2, "NonFiniteLossError")


def test_time_limit_moves_the_schedule_ahead_then_stops(monkeypatch):
    clock = iter(range(0, 10_000, 15))  # every reading of the clock: 15 s later
    monkeypatch.setattr(loop_mod.time, "perf_counter", lambda: float(next(clock)))
    params, opt, objective = problem()
    rec = Recorder()
    sched = Schedule(steps=100, warmup_steps=0)
    run = train_(objective, params, opt, sched, [TimeLimit(1.0), rec], progress=False)
    lrs = [lr for k, _, lr in rec.events if k == "before"]
    # the time limit reads the clock once per step (the loop once more at its start): used = 0, 1/4, 2/4, 3/4, 1
    assert run.step == 4 and run.stopped == "time limit of 1 min reached after 4 steps"
    assert lrs == [0.1 * sched.factor(p) for p in (0, 25, 50, 75)]


def test_resume_restores_every_callbacks_state_and_repeats_the_same_steps(tmp_path):
    sched = Schedule(steps=6, warmup_steps=1)
    params, opt, objective = problem()
    ref = train_(objective, params, opt, sched, [Recorder()], progress=False)

    class Interrupt(Callback):
        def after_step(self, run):
            if run.step == 4:
                raise KeyboardInterrupt

    params, opt, objective = problem()
    ckpt = Checkpoints(str(tmp_path), every=2, keep=3, resume=True, settings={"seed": 0})
    with pytest.raises(KeyboardInterrupt):  # (the checkpoint of step 4 is written after Interrupt raises: not at all)
        train_(objective, params, opt, sched, [Recorder(), Interrupt(), ckpt], progress=False)
    params, opt, objective = problem()
    rec = Recorder()
    run = train_(objective, params, opt, sched, [rec, Checkpoints(str(tmp_path), 2, 3, True, {"seed": 0})],
                 progress=False)
    assert run.resumed_from == 2 and rec.count == 6  # its state came back: 2 steps before, 4 now
    assert [s for k, s, _ in rec.events if k == "before"] == [2, 3, 4, 5]
    assert run.losses == ref.losses and torch.equal(params["w"], ref.params["w"])
    assert math.isclose(opt.param_groups[0]["lr"], 0.1 * sched.factor(6))
    params, opt, objective = problem()
    with pytest.raises(ValueError, match="other settings"):
        train_(objective, params, opt, sched, [Checkpoints(str(tmp_path), 2, 3, True, {"seed": 1})], progress=False)
