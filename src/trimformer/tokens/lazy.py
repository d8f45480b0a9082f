"""LazyLLM (Fu et al., 2024): prefill computes, in later blocks, only the prompt tokens that the last
position attends to most.

At the input of block l >= `start`, tokens are ranked by the previous block's attention from the
last position (mean over heads); the share kept shrinks geometrically to `keep` at the last block.
The first token (attention sink) and the last position are always kept. Each layer's KV cache holds
the tokens that layer computed; decoding continues on that cache. `revive`: at every decoding step
each layer re-ranks the prompt by the current position's attention and computes the top tokens it
lacks from their saved states (LazyLLM's Aux Cache, see revive.py); without it, pruned tokens stay out.
GPT-2 reshapes its last hidden states to the input length: there pass recover=len(blocks), fill="skip".
On smollm2-135m revival did not raise agreement with dense generation (benchmarks/lazyllm_revive.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import TOKENS
from .base import Context, TokenPruner


@TOKENS.register("lazy")
@dataclass
class Lazy(TokenPruner):
    keep: float = 0.15  # with start=4: 2.1x fewer prefill FLOPs on smollm2-135m (benchmarks/lazyllm.py)
    start: int = 4
    revive: bool = False

    needs_attention: ClassVar[bool] = True
    decoder_only: ClassVar[bool] = True

    def score(self, ctx: Context) -> torch.Tensor:
        T = ctx.valid.shape[1]
        last = torch.tensor([T - 1], device=ctx.x.device)
        return ctx.attention(rows=last).mean(1)[:, 0]  # (B, T) attention of the last position
