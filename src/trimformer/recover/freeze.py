"""SlimFit-style freezing (Ardakani et al., 2023, arXiv:2305.18513): after a first share of the steps,
freeze the blocks whose weights moved least relative to their size; they then cost no weight gradients
and no optimizer updates for the rest of the run.

Movement is read from AdamW's own state after each step (lr * |m_hat / (sqrt(v_hat) + eps)|, the update
it just applied, weight decay aside), so no copy of the weights is kept.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .loop import Callback, Run


class Freezer(Callback):
    """`groups`: block index -> its trained parameters by name. Freezes `fraction` of them at `at_step`."""

    name = "freezer"

    def __init__(self, groups: dict[int, dict[str, nn.Parameter]], fraction: float, at_step: int):
        self.groups, self.fraction, self.at_step = groups, fraction, at_step
        self.moved = dict.fromkeys(groups, 0.0)
        self.frozen: list[int] = []

    def after_step(self, run: Run) -> None:
        self.track(run.opt, run.step)
        self.maybe_freeze(run.step)

    @torch.no_grad()
    def track(self, opt: torch.optim.Optimizer, step: int) -> None:
        if self.frozen or step >= self.at_step or not self.fraction:
            return
        for g in opt.param_groups:
            lr, (b1, b2), eps = g["lr"], g["betas"], g["eps"]
            ids = {id(p) for p in g["params"]}
            for b, params in self.groups.items():
                sq, size = 0.0, 0.0
                for p in params.values():
                    st = opt.state.get(p)
                    if id(p) not in ids or not st:
                        continue
                    t = float(st["step"])
                    u = (st["exp_avg"] / (1 - b1**t)) / ((st["exp_avg_sq"] / (1 - b2**t)).sqrt() + eps)
                    sq += u.pow(2).sum().item()
                    size += p.pow(2).sum().item()
                self.moved[b] += lr * math.sqrt(sq) / max(math.sqrt(size), 1e-12)

    def maybe_freeze(self, step: int) -> list[int]:
        """At `at_step`, freeze the least-moved blocks; returns the newly frozen block indices."""
        if step != self.at_step or self.frozen or not self.fraction:
            return []
        k = int(self.fraction * len(self.groups))
        self.frozen = sorted(sorted(self.moved, key=self.moved.__getitem__)[:k])
        self._apply()
        return self.frozen

    def _apply(self) -> None:
        for b in self.frozen:
            for p in self.groups[b].values():
                p.requires_grad_(False)
                p.grad = None

    def state(self) -> dict:
        return {"moved": dict(self.moved), "frozen": list(self.frozen)}

    def load(self, state: dict) -> None:
        self.moved = {int(k): float(v) for k, v in state["moved"].items()}
        self.frozen = [int(b) for b in state["frozen"]]
        self._apply()
