"""KL of a decoder to its dense self on calibration windows, re-running only the blocks a change touches;
and the trial changes it scores (`silenced`: a sublayer adds 0; `swapped`: a projection with other weights).

The hidden state entering every block is cached once; scoring a change to block i (a silenced sublayer,
a narrower FFN) re-runs blocks i..L-1, the final norm and the head from that cache, and compares the
next-token distribution with the dense one (KL(dense || model), nats per token). FinerCut's greedy
search, the per-block candidate library of `search` and the measured allocation of `width` use it.
Forwards run under bf16 autocast where the CPU/GPU multiplies bf16 natively (precision="auto"); the
dense reference is computed the same way, so an unchanged model scores 0.

The KL is exact yet needs neither the dense distributions nor a softmax per trial: with the head linear,
logits z = W h + b and dense probabilities P,
    KL(P || softmax z) = (lse z - lse z0) - (P W) . (h - h0)      (the bias cancels)
so the probe keeps, per scored position, the dense final-norm state h0, lse z0 and the d-vector P W; a
trial costs the head matmul and one logsumexp, run in chunks of positions into buffers kept for the next trial
(a fresh 100-MB logits tensor per chunk costs more in page faults than its logsumexp). `positions` (0 = all) still
allows averaging over evenly spaced positions only (every position runs through the blocks).

Windows run through the blocks `TOKENS` positions at a time (several windows per forward) whatever the
calibration batch size: the cached states are all in memory anyway, and one (16 x 256)-token GEMM is about
1.5 x faster here than sixteen (1 x 256) ones. Batching changes bf16 rounding (KL to about 1e-4 relative).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .. import calibrate
from ..models import Anatomy, Block
from ..models.offload import onload


class Probe:
    """Cached block inputs of `windows` (n, T) on a causal LM, and its dense next-token distributions."""

    CHUNK = 512  # positions per head matmul + logsumexp (the head weight is read once per chunk)
    TOKENS = 4096  # positions per block forward: windows are batched up to this many tokens

    def __init__(self, anatomy: Anatomy, windows: torch.Tensor, *, batch_size: int = 1, precision: str = "auto",
                 positions: int = 0):
        if not anatomy.causal or anatomy.head is None:
            raise ValueError("the KL probe needs a causal LM with an output head (next-token distributions)")
        if positions < 0:
            raise ValueError(f"positions must be >= 0 (0 = every position), got {positions}")
        T = windows.shape[1]
        batch_size = max(batch_size, self.TOKENS // T)
        self.at = torch.arange(T) if positions in (0, T) or positions > T else \
            torch.linspace(0, T - 1, positions).round().long().unique()  # (P,) scored positions
        self.anatomy = anatomy
        self.dtype = calibrate.resolve_precision(precision, next(anatomy.model.parameters()).device)
        inputs, self.kwargs = calibrate.capture_inputs(anatomy, windows, batch_size)
        self.states: list[list[torch.Tensor]] = [inputs]  # states[i]: inputs of block i, one per batch
        head = anatomy.head
        if not isinstance(head, torch.nn.Linear):
            raise ValueError(f"the KL probe needs a linear output head, got {type(head).__name__}")
        self._buffers: dict[str, torch.Tensor] = {}
        self._head: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.refresh(0)
        self.ref = []  # per batch: (h0 (B, P, d), lse0 (B, P), PW (B, P, d)), fp32
        for h in self._normed(self.states[-1]):
            lse, pw = [], []
            for c in h.split(self.CHUNK, 1):  # (B, c, d)
                with self.compute():
                    z = head(c).float()  # (B, c, V)
                lse.append(self._lse(c))
                pw.append(torch.softmax(z, -1) @ head.weight.float())  # (B, c, d)
            self.ref.append((h, torch.cat(lse, 1), torch.cat(pw, 1)))
        self.tokens = sum(r[1].numel() for r in self.ref)

    def compute(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.states[0][0].device.type, dtype=self.dtype)

    @torch.no_grad()
    def run_block(self, block: Block, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = []
        with self.compute():
            for x, kw in zip(xs, self.kwargs):
                y = block.module(x, **calibrate.for_block(kw, block))
                y = y[0] if isinstance(y, tuple) else y
                outs.append(y.to(x.dtype))
        return outs

    @torch.no_grad()
    def _normed(self, hs: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The final-norm states at the scored positions, (B, P, d) fp32 per batch."""
        an = self.anatomy
        for h in hs:
            h = h[:, self.at]  # (B, P, d)
            with self.compute():
                h = an.final_norm(h) if an.final_norm is not None else h
            yield h.float()

    @torch.no_grad()
    def refresh(self, start: int = 0) -> None:
        """Recompute the inputs of blocks start+1.. after block `start` (or anything after it) changed."""
        del self.states[start + 1:]
        xs = self.states[start]
        for block in self.anatomy.blocks[start:]:
            xs = self.run_block(block, xs)
            self.states.append(xs)

    @torch.no_grad()
    def kl_from(self, start: int) -> float:
        """KL(dense || model) per token, the model re-run from block `start` on the cached inputs."""
        xs = self.states[start]
        for block in self.anatomy.blocks[start:]:
            xs = self.run_block(block, xs)
        kl = 0.0
        for h, (h0, lse0, pw) in zip(self._normed(xs), self.ref):
            lse = torch.cat([self._lse(c) for c in h.split(self.CHUNK, 1)], 1)  # (B, P)
            kl += ((lse - lse0) - (pw * (h - h0)).sum(-1)).double().sum().item()
        return kl / self.tokens

    def _buffer(self, key: str, dtype: torch.dtype, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        n = shape[0] * shape[1]
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = self._buffers[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def _head_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self.anatomy.head
        streamed = head.weight.is_meta  # a streamed model's head is real only inside onload: keep a copy
        with onload(head):
            W, b = head.weight.detach(), None if head.bias is None else head.bias.detach()
            dtype = self.dtype or W.dtype
            return tuple(None if t is None else t.to(dtype, copy=streamed) for t in (W, b))

    def _lse(self, h: torch.Tensor) -> torch.Tensor:
        """logsumexp of the head's logits at states h (B, c, d): (B, c). The head runs in the compute dtype (its
        weight cast once, as autocast would cast it per call) into kept buffers, the logsumexp in fp32 in place."""
        if self._head is None:
            self._head = self._head_weights()
        W, bias = self._head
        B, c, d = h.shape
        z = torch.mm(h.reshape(B * c, d).to(W.dtype), W.t(), out=self._buffer("z", W.dtype, (B * c, W.shape[0]), W.device))
        if bias is not None:
            z += bias
        zf = z if z.dtype == torch.float32 else self._buffer("f", torch.float32, z.shape, z.device).copy_(z)
        m = zf.amax(-1, keepdim=True)
        return zf.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1)).view(B, c)

    @torch.no_grad()
    def block_inputs(self, i: int) -> list[torch.Tensor]:
        return self.states[i]


def silence(block: Block, kind: str) -> torch.utils.hooks.RemovableHandle:
    """Make one sublayer ('attn' or 'mlp') add 0 to the residual stream: a forward hook, `.remove()` it to undo.
    On a pre-norm block this is exactly what removing the sublayer does (surgery.remove_attention / remove_mlp)."""
    if kind == "attn":
        return block.attention.module.register_forward_hook(lambda _m, _a, out: (torch.zeros_like(out[0]), *out[1:]))
    return block.mlp.down.module.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))


@contextlib.contextmanager
def silenced(block: Block, kind: str) -> Iterator[None]:
    """Make one sublayer add 0 to the residual stream while inside."""
    h = silence(block, kind)
    try:
        yield
    finally:
        h.remove()


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
