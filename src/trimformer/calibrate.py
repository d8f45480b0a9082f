"""Block-by-block calibration (DESIGN.md "calibrate").

Capture the inputs of block 0, then for each block: let the method collect what it needs from
the block's projections, let it prune the block, and run the *pruned* block to make the inputs
of the next one. Only one block's statistics live at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
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


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """The dtype calibration forwards run in: None (the model's own) or torch.bfloat16.

    'auto' picks bf16 where the hardware multiplies bf16 natively (CPUs with AMX or AVX512-BF16, CUDA GPUs
    with bf16), where it is 4-7x faster than fp32; statistics are always accumulated in fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        native = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() or \
            getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        return torch.bfloat16 if native else None
    return None


@dataclass
class BlockCalib:
    """One block and its calibration inputs (one entry per calibration batch)."""

    block: Block
    inputs: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    compute_dtype: torch.dtype | None = None  # autocast dtype of the forwards (resolve_precision)

    def compute(self) -> contextlib.AbstractContextManager:
        """The context every calibration forward of this block runs in (bf16 autocast, or nothing)."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        device = self.inputs[0].device.type if self.inputs else "cpu"
        return torch.autocast(device, dtype=self.compute_dtype)

    def gram(self, X: torch.Tensor) -> torch.Tensor:
        """X^T X for X (tokens, in), always in fp32 (outside autocast).

        A bf16 product would round every entry of X^T X to 8 bits; for inputs with one dominant direction
        (attention sinks, massive activations) that error exceeds the damping and the small eigenvalues OBS
        relies on, so the Hessian turns indefinite. The forwards may run in bf16; the statistics never do.
        """
        with torch.autocast(X.device.type, enabled=False):
            X = X.float()
            return X.t() @ X

    @torch.no_grad()
    def run(self) -> list[torch.Tensor]:
        """Run the block (as it is now) on every calibration batch."""
        outs = []
        with self.compute():
            for x, kw in zip(self.inputs, self.kwargs):
                y = self.block.module(x, **kw)
                y = y[0] if isinstance(y, tuple) else y
                outs.append(y if y.dtype == x.dtype else y.to(x.dtype))
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
                    XtX = self.gram(X)  # (in, in)
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
    anatomy: Anatomy,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "calibrating",
    precision: str = "fp32",
) -> Iterator[BlockCalib]:
    """Yield each block with its calibration inputs; after the caller prunes it, its outputs feed the next.

    precision: 'fp32' runs the forwards in the model's dtype; 'bf16' / 'auto' (see resolve_precision) run
    them under bf16 autocast, several times faster where bf16 is native. X^T X is always fp32 (BlockCalib.gram).
    """
    inputs, kwargs = capture_inputs(anatomy, windows, batch_size)
    compute_dtype = resolve_precision(precision, inputs[0].device if inputs else "cpu")
    if compute_dtype is not None and next(anatomy.model.parameters()).dtype == compute_dtype:
        compute_dtype = None  # the model already runs in that dtype
    for block in bar(anatomy.blocks, desc=desc, unit="block", disable=not progress):
        bc = BlockCalib(block, inputs, kwargs, compute_dtype)
        yield bc
        inputs = bc.run()  # outputs of the pruned block
