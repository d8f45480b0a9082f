"""Block-by-block calibration (DESIGN.md "calibrate").

Capture the inputs of block 0, then for each block: let the method collect what it needs from
the block's projections, let it prune the block, and run the *pruned* block to make the inputs
of the next one. Only one block's statistics live at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .models import Anatomy, Block, Proj
from .progress import bar


@dataclass
class LayerStats:
    """What one projection saw: token count, per-input-channel sum of squares, optional X^T X."""

    n: int = 0
    sq: torch.Tensor | None = None  # (in,) sum over tokens of x^2
    H: torch.Tensor | None = None  # (in, in) sum over tokens of x x^T

    @property
    def norm(self) -> torch.Tensor:
        """||X_j||_2 per input channel (the Wanda activation term)."""
        return self.sq.sqrt()

    @property
    def mean_sq(self) -> torch.Tensor:
        return self.sq / max(self.n, 1)


class _Stop(Exception):
    pass


@dataclass
class BlockCalib:
    """One block and its calibration inputs (one entry per calibration batch)."""

    block: Block
    inputs: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    _outputs: list[torch.Tensor] | None = field(default=None, repr=False)

    @torch.no_grad()
    def run(self) -> list[torch.Tensor]:
        """Run the block (as it is now) on every calibration batch."""
        outs = []
        for x, kw in zip(self.inputs, self.kwargs):
            y = self.block.module(x, **kw)
            outs.append(y[0] if isinstance(y, tuple) else y)
        return outs

    @torch.no_grad()
    def collect(self, projs: dict[str, Proj], hessian: bool = False) -> dict[str, LayerStats]:
        """Run the block with hooks on `projs`; return each one's input statistics."""
        stats = {name: LayerStats() for name in projs}
        hooks = []

        def make_hook(name: str):
            def hook(_mod: nn.Module, args: tuple, _out: Any) -> None:
                X = args[0].reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
                st = stats[name]
                sq = (X * X).sum(0)
                st.sq = sq if st.sq is None else st.sq + sq
                if hessian:
                    XtX = X.t() @ X  # (in, in)
                    st.H = XtX if st.H is None else st.H + XtX
                st.n += X.shape[0]

            return hook

        try:
            for name, p in projs.items():
                hooks.append(p.module.register_forward_hook(make_hook(name)))
            self.run()
        finally:
            for h in hooks:
                h.remove()
        return stats


@torch.no_grad()
def capture_inputs(anatomy: Anatomy, windows: torch.Tensor, batch_size: int = 1) -> tuple[list, list]:
    """Inputs (hidden states, keyword arguments) of block 0 for each calibration batch."""
    model = anatomy.model
    first = anatomy.blocks[0].module
    inputs: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []

    def pre_hook(_mod: nn.Module, args: tuple, kw: dict) -> None:
        x = args[0] if args else kw.pop("hidden_states")
        inputs.append(x)
        kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value", "hidden_states")}
        kw["use_cache"] = False
        kwargs.append(kw)
        raise _Stop

    device = next(model.parameters()).device
    h = first.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for i in range(0, windows.shape[0], batch_size):
            batch = windows[i : i + batch_size].to(device)
            try:
                if anatomy.causal:
                    model(input_ids=batch, use_cache=False)
                else:
                    model(input_ids=batch)
            except _Stop:
                pass
    finally:
        h.remove()
    return inputs, kwargs


def blocks(
    anatomy: Anatomy, windows: torch.Tensor, *, batch_size: int = 1, progress: bool = True, desc: str = "calibrating"
) -> Iterator[BlockCalib]:
    """Yield each block with its calibration inputs; after the caller prunes it, its outputs feed the next."""
    inputs, kwargs = capture_inputs(anatomy, windows, batch_size)
    for block in bar(anatomy.blocks, desc=desc, unit="block", disable=not progress):
        bc = BlockCalib(block, inputs, kwargs)
        yield bc
        inputs = bc.run()  # outputs of the pruned block
