"""Keeping the cuts during training: masks found from zeros (or given) stay exact; gradual magnitude pruning.

A mask is a bool tensor shaped like its parameter (True = kept). Gradients of pruned weights are
zeroed by a hook, and the weights are re-masked after every optimizer step, so AdamW's decoupled
weight decay or any numerical drift can never revive a pruned weight.
"""

from __future__ import annotations

import torch
from torch import nn

from .loop import Callback, Run


def cubic_sparsity(step: int, s_init: float, s_final: float, start: int, end: int) -> float:
    """Zhu & Gupta (2017, arXiv:1710.01878): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t_end - t0))^3."""
    if step <= start:
        return s_init
    if step >= end:
        return s_final
    frac = (step - start) / (end - start)
    return s_final + (s_init - s_final) * (1.0 - frac) ** 3


class MaskKeeper:
    """Masks of the trained parameters, by parameter name.

    `found`: a mask for every trainable parameter of 2+ dims that holds zeros at the start (what weight
    pruners leave); `given` (name -> mask, names with or without '.weight') adds or overrides.
    """

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], given: dict[str, torch.Tensor] | None = None,
                 store_found: bool = True):
        """`store_found=False`: only note which parameters hold zeros (`zero_names`), keep no mask for them
        (LoRA: the frozen weights' own zeros are the masks)."""
        self.params = params
        self.masks: dict[str, torch.Tensor] = {}
        self.zero_names: list[str] = []
        for name, p in params.items():
            if p.dim() >= 2 and p.count_nonzero().item() < p.numel():
                self.zero_names.append(name)
                if store_found:
                    self.masks[name] = p.detach() != 0
        for name, m in (given or {}).items():
            key = name if name in params else f"{name}.weight"
            if key not in params:
                raise ValueError(
                    f"mask {name!r} names no trained parameter; names look like {next(iter(params), '?')!r}"
                )
            if tuple(m.shape) != tuple(params[key].shape):
                raise ValueError(f"mask {name!r} has shape {tuple(m.shape)}, its parameter {tuple(params[key].shape)}")
            self.masks[key] = m.to(device=params[key].device, dtype=torch.bool)
            self.zero_names += [] if key in self.zero_names else [key]
        self._hooks: list = []
        self.initial_sparsity = {n: self.sparsity(n) for n in params if params[n].dim() >= 2}

    def sparsity(self, name: str) -> float:
        m = self.masks.get(name)
        if m is None:
            return 1.0 - self.params[name].count_nonzero().item() / self.params[name].numel() if name in self.zero_names else 0.0
        return 1.0 - m.count_nonzero().item() / m.numel()

    def attach(self) -> None:
        """Zero the gradients of pruned weights (so optimizer moments of pruned weights stay zero)."""
        self.detach()
        for name, m in self.masks.items():
            self._hooks.append(self.params[name].register_hook(lambda g, m=m: g * m))
        self.apply_()

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @torch.no_grad()
    def apply_(self) -> None:
        for name, m in self.masks.items():
            self.params[name].mul_(m)

    @torch.no_grad()
    def magnitude_step_(self, names: list[str], target: dict[str, float]) -> None:
        """Gradual magnitude pruning: in each named parameter keep the largest |W|, pruning to `target[name]`.

        Pruned weights score -1 so they stay pruned (the mask only grows); compared across the layer.
        """
        changed = False
        for name in names:
            p = self.params[name]
            n_prune = int(round(target[name] * p.numel()))
            old = self.masks.get(name)
            if n_prune <= (0 if old is None else p.numel() - old.count_nonzero().item()):
                continue
            score = p.detach().abs().float()
            if old is not None:
                score = score.masked_fill(~old, -1.0)
            keep = torch.ones(p.numel(), dtype=torch.bool, device=p.device)
            keep[torch.topk(score.flatten(), n_prune, largest=False).indices] = False
            self.masks[name] = keep.view_as(p)
            p.mul_(self.masks[name])
            changed = True
        if changed and self._hooks:  # re-attach so the new masks reach the gradient hooks
            self.attach()

    def state(self) -> dict[str, torch.Tensor]:
        return {n: m.cpu() for n, m in self.masks.items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.masks = {n: m.to(self.params[n].device) for n, m in state.items()}
        if self._hooks:
            self.attach()
        self.apply_()


class KeepMasks(Callback):
    """The cuts stay cut: pruned weights get no gradient, and are re-masked after every optimizer step."""

    name = "masks"

    def __init__(self, keeper: MaskKeeper):
        self.keeper = keeper

    def start(self, run: Run) -> None:
        self.keeper.attach()

    def after_step(self, run: Run) -> None:
        self.keeper.apply_()

    def end(self, run: Run) -> None:
        self.keeper.detach()

    def state(self) -> dict[str, torch.Tensor]:
        return self.keeper.state()

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.keeper.load(state)


class GradualMagnitude(Callback):
    """Gradual magnitude pruning of the `names` parameters to `sparsity`, cubic schedule from step `start`
    to step `end`, every `every` steps (a pruning step comes before that step's loss)."""

    def __init__(self, keeper: MaskKeeper, names: list[str], sparsity: float, start: int, end: int, every: int):
        self.keeper, self.names, self.sparsity = keeper, names, sparsity
        self.start_step, self.end_step, self.every = start, end, every

    def before_step(self, run: Run) -> None:
        target = self.targets(run.step)
        if target is not None:
            self.keeper.magnitude_step_(self.names, target)

    def targets(self, step: int) -> dict[str, float] | None:
        """Per-layer sparsity for this step, or None when this is not a pruning step."""
        start, end = self.start_step, self.end_step
        if step < start or step > end or (step != end and (step - start) % max(self.every, 1)):
            return None
        initial = self.keeper.initial_sparsity
        return {n: max(initial.get(n, 0.0), cubic_sparsity(step, initial.get(n, 0.0), self.sparsity, start, end))
                for n in self.names}


__all__ = ["GradualMagnitude", "KeepMasks", "MaskKeeper", "cubic_sparsity"]
