"""A token press composed with a channel press (e.g. SnapKV + ThinK)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Observation, Press


@dataclass(init=False)
class Compose(Press):
    """A token press and a channel press together: tokens evicted by the first, key channels of the
    kept tokens removed by the second (e.g. SnapKV + ThinK)."""

    tokens: Press
    keys: Press

    def __init__(self, tokens: Press, keys: Press) -> None:
        self.tokens, self.keys = tokens, keys
        self.__post_init__()

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, Press) or not isinstance(self.keys, Press):
            raise ValueError("Compose needs a token press and a channel press: Compose(SnapKV(0.5), ThinK(0.5))")
        self.ratio = self.tokens.ratio
        super().__post_init__()

    def observe(self, obs: Observation) -> None:
        self.tokens.observe(obs)

    @property
    def observes(self) -> bool:
        return self.tokens.observes

    def budget(self, obs: Observation, decode_budget: int | None) -> torch.Tensor | None:
        return self.tokens.budget(obs, decode_budget)

    def score(self, obs: Observation) -> torch.Tensor:
        return self.tokens.score(obs)

    def select(self, scores: torch.Tensor, keep: torch.Tensor, obs: Observation) -> torch.Tensor:
        return self.tokens.select(scores, keep, obs)

    def channels(self, obs: Observation) -> torch.Tensor | None:
        return self.keys.channels(obs)
