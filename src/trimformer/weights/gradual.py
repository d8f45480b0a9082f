"""Gradual magnitude pruning during training with the cubic schedule (Zhu & Gupta 2017, arXiv:1710.01878).

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^3     for t0 <= t <= t1, pruning every `frequency` steps.

Between pruning steps the masks stay fixed: `step()` re-applies them after every optimizer step, so weights the
optimizer revives go back to zero. Plain loop: `gmp = GradualMagnitude(...).attach(model)`, then `gmp.step(i)`
after each `optimizer.step()`. With `transformers.Trainer`: `callbacks=[gmp.callback()]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import Config
from ..models import anatomy_of
from .base import Target
from .masks import check_sparsity, topk_mask


@dataclass
class GradualMagnitude(Config):
    final_sparsity: float = 0.5
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    targets: list[Target] = field(default_factory=lambda: ["all"])

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sparsity(self.final_sparsity)
        check_sparsity(self.initial_sparsity)
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(f"initial_sparsity {self.initial_sparsity} is above final_sparsity {self.final_sparsity}")
        if not 0 <= self.start_step < self.end_step:
            raise ValueError(f"need 0 <= start_step < end_step, got {self.start_step} and {self.end_step}")
        if self.frequency < 1:
            raise ValueError(f"frequency (steps between pruning steps) must be >= 1, got {self.frequency}")
        self._targets = None if "all" in self.targets or not self.targets else set(self.targets)
        self._masks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> ((out, in) weight view, keep mask)
        self.current = 0.0

    def sparsity_at(self, step: int) -> float:
        """The cubic schedule; constant before start_step and after end_step."""
        t = min(max(step, self.start_step), self.end_step)
        frac = (t - self.start_step) / (self.end_step - self.start_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1 - frac) ** 3

    def attach(self, model: nn.Module) -> GradualMagnitude:
        for block in anatomy_of(model).blocks:
            for short, p in block.projections().items():
                if self._targets is None or short in self._targets or short.split(".")[0] in self._targets:
                    self._masks[p.name] = (p.weight, torch.ones_like(p.weight, dtype=torch.bool))
        return self

    def is_pruning_step(self, step: int) -> bool:
        return self.start_step <= step <= self.end_step and (
            (step - self.start_step) % self.frequency == 0 or step == self.end_step)

    @torch.no_grad()
    def step(self, step: int) -> None:
        """Call after each optimizer step: new masks on a pruning step, then (always) apply the masks."""
        if not self._masks:
            raise RuntimeError("GradualMagnitude.step() before attach(model)")
        if self.is_pruning_step(step):
            self.current = self.sparsity_at(step)
            for name, (W, _) in self._masks.items():
                self._masks[name] = (W, topk_mask(W.abs().float(), self.current))  # pruned ones are 0: stay pruned
        for W, keep in self._masks.values():
            W.mul_(keep.to(W.dtype))

    def callback(self):
        """A `transformers.TrainerCallback` driving this schedule from `state.global_step`."""
        from transformers import TrainerCallback

        gmp = self

        class GMPCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                if not gmp._masks:
                    gmp.attach(model)

            def on_step_end(self, args, state, control, **kwargs):
                gmp.step(state.global_step)

        return GMPCallback()
