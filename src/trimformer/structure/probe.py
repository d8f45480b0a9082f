"""KL of a decoder to its dense self on calibration windows, re-running only the blocks a change touches.

The hidden state entering every block is cached once; scoring a change to block i (a silenced sublayer,
a narrower FFN) re-runs blocks i..L-1, the final norm and the head from that cache, and compares the
next-token distribution with the dense one (KL(dense || model), nats per token). FinerCut's greedy
search, the per-block candidate library of `search` and the measured allocation of `width` use it.
Forwards run under bf16 autocast where the CPU/GPU multiplies bf16 natively (precision="auto"); the
dense reference is computed the same way, so an unchanged model scores ~0. The head and the softmax
over the vocabulary cost as much as a few blocks, so the KL is averaged over at most `positions`
evenly spaced positions per window (all positions still run through the blocks; the KL there is exact).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from .. import calibrate
from ..models import Anatomy, Block


class Probe:
    """Cached block inputs of `windows` (n, T) on a causal LM, and its dense next-token log-probs."""

    def __init__(self, anatomy: Anatomy, windows: torch.Tensor, *, batch_size: int = 1, precision: str = "auto",
                 positions: int = 0):
        if not anatomy.causal or anatomy.head is None:
            raise ValueError("the KL probe needs a causal LM with an output head (next-token distributions)")
        if positions < 0:
            raise ValueError(f"positions must be >= 0 (0 = every position), got {positions}")
        T = windows.shape[1]
        self.at = torch.arange(T) if positions in (0, T) or positions > T else \
            torch.linspace(0, T - 1, positions).round().long().unique()  # (P,) scored positions
        self.anatomy = anatomy
        self.dtype = calibrate.resolve_precision(precision, next(anatomy.model.parameters()).device)
        inputs, self.kwargs = calibrate.capture_inputs(anatomy, windows, batch_size)
        self.states: list[list[torch.Tensor]] = [inputs]  # states[i]: inputs of block i, one per batch
        self.refresh(0)
        self.ref = list(self._logprobs(self.states[-1]))  # (B, T, V) each, fp32
        self.tokens = sum(r[..., 0].numel() for r in self.ref)

    def compute(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.states[0][0].device.type, dtype=self.dtype)

    @torch.no_grad()
    def _run(self, block: Block, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = []
        with self.compute():
            for x, kw in zip(xs, self.kwargs):
                y = block.module(x, **kw)
                y = y[0] if isinstance(y, tuple) else y
                outs.append(y.to(x.dtype))
        return outs

    @torch.no_grad()
    def _logprobs(self, hs: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        an = self.anatomy
        for h in hs:
            h = h[:, self.at]  # (B, P, d)
            with self.compute():
                h = an.final_norm(h) if an.final_norm is not None else h
                logits = an.head(h)
            yield F.log_softmax(logits.float(), -1)  # (B, T, V)

    @torch.no_grad()
    def refresh(self, start: int = 0) -> None:
        """Recompute the inputs of blocks start+1.. after block `start` (or anything after it) changed."""
        del self.states[start + 1:]
        xs = self.states[start]
        for block in self.anatomy.blocks[start:]:
            xs = self._run(block, xs)
            self.states.append(xs)

    @torch.no_grad()
    def kl_from(self, start: int) -> float:
        """KL(dense || model) per token, the model re-run from block `start` on the cached inputs."""
        xs = self.states[start]
        for block in self.anatomy.blocks[start:]:
            xs = self._run(block, xs)
        kl = 0.0
        for q, p in zip(self._logprobs(xs), self.ref):
            kl += F.kl_div(q, p, log_target=True, reduction="sum").item()
        return kl / self.tokens

    @torch.no_grad()
    def block_inputs(self, i: int) -> list[torch.Tensor]:
        return self.states[i]


@contextlib.contextmanager
def swapped(p: Any, W: torch.Tensor, b: torch.Tensor | None = None) -> Iterator[None]:
    """Temporarily give projection `p` (a Proj) the (out, in) weight W (and bias b)."""
    W0 = p.weight.detach().clone()
    b0 = p.bias.detach().clone() if p.bias is not None else None
    try:
        with torch.no_grad():
            p.weight.copy_(W.to(p.weight.dtype))
            if b is not None and p.bias is not None:
                p.bias.copy_(b.to(p.bias.dtype))
        yield
    finally:
        with torch.no_grad():
            p.weight.copy_(W0)
            if b0 is not None:
                p.bias.copy_(b0)
