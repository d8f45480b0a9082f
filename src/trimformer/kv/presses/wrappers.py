"""Presses around presses: a per-head budget (AdaKV) and a per-layer budget (PyramidKV)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import Observation, Press, top_per_head
from ..build import build_press


def _inner(press: str | Press, ratio: float) -> Press:
    return build_press(press, ratio) if isinstance(press, str) else press


class _Wrapper(Press):
    """Delegates observing, scoring and channel choice to the wrapped `self.press`; subclasses change budgets."""

    press: Press

    def observe(self, obs: Observation) -> None:
        self.press.observe(obs)

    @property
    def observes(self) -> bool:
        return self.press.observes

    def score(self, obs: Observation) -> torch.Tensor:
        return self.press.score(obs)

    def channels(self, obs: Observation) -> torch.Tensor | None:
        return self.press.channels(obs)


@dataclass(init=False)
class PerHead(_Wrapper):
    """AdaKV (Feng et al., 2024): one budget per layer shared by its heads; the heads with sharper
    scores keep more. Every head keeps at least `floor` x its uniform share. Scores must be comparable
    across heads (attention-based presses). Heads end up with different lengths, stored packed."""

    press: str | Press
    ratio: float
    floor: float

    def __init__(self, press: str | Press, ratio: float = 0.5, floor: float = 0.2) -> None:
        self.press, self.ratio, self.floor = press, ratio, floor
        self.__post_init__()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"PerHead: floor must be in [0, 1], got {self.floor}")
        self.press = _inner(self.press, self.ratio)


    def select(self, scores: torch.Tensor, keep: torch.Tensor, obs: Observation) -> torch.Tensor:
        B, H, L = scores.shape
        scores = scores.masked_fill(~obs.valid, float("-inf"))
        forced = top_per_head(scores, (keep * self.floor).long())  # (B, H, L)
        rest = (keep.sum(-1) - forced.sum((-1, -2)))  # (B,) budget left per row, shared by its heads
        free = scores.masked_fill(forced, float("-inf")).view(B, H * L)  # (B, H*L)
        chosen = top_per_head(free[:, None], rest[:, None])[:, 0].view(B, H, L)
        return forced | (chosen & obs.valid)


@dataclass(init=False)
class PerLayer(_Wrapper):
    """PyramidKV (Cai et al., 2024): lower layers keep more, upper layers less, the mean share removed
    staying `ratio`. `spread` is how far the first and last layers' kept shares differ from the mean."""

    press: str | Press
    ratio: float
    spread: float

    def __init__(self, press: str | Press, ratio: float = 0.5, spread: float = 0.5) -> None:
        self.press, self.ratio, self.spread = press, ratio, spread
        self.__post_init__()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.spread <= 1.0:
            raise ValueError(f"PerLayer: spread must be in [0, 1], got {self.spread}")
        self.press = _inner(self.press, self.ratio)

    def layer_ratio(self, layer: int, num_layers: int) -> float:
        kept = 1.0 - self.ratio
        t = 0.0 if num_layers == 1 else 1.0 - 2.0 * layer / (num_layers - 1)  # +1 first layer, -1 last
        return min(max(1.0 - kept * (1.0 + self.spread * t), 0.0), 0.99)


    def select(self, scores: torch.Tensor, keep: torch.Tensor, obs: Observation) -> torch.Tensor:
        return self.press.select(scores, keep, obs)
