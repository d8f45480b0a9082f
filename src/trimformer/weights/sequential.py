"""Hessians X^T X for the projections of one block, shared between projections that read the same input.

q/k/v read one tensor, and so do gate/up: their Hessian is computed once and the layers are solved
together. With `first_only`, each forward stops as soon as a projection reads a *different* input than
the first one, which gives the "true sequential" order of SparseGPT: solve q/k/v, then o sees the
pruned attention, then gate/up, then down, at about the cost of one extra block forward.

With a dense stream (calibrate.blocks(dense_targets=True)), each group also gets C = X_dense^T X, the
cross-product of the dense model's input to those projections with the pruned model's input, so the
projections can be fitted to the dense outputs (asymmetric calibration; see SparseGPT.asymmetric).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibrate import BlockCalib
from ..models import Proj


class _Stop(Exception):
    pass


@dataclass
class InputGroup:
    """Projections that read one input, with that input's X^T X (summed over calibration tokens)."""

    names: list[str]
    H: torch.Tensor  # (in, in)
    n: int = 0
    C: torch.Tensor | None = None  # (in, in): X_dense^T X, with a dense stream
    sq: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.sq = torch.diag(self.H)  # sum of x^2 per input channel (Wanda's ||X_j||^2)


@torch.no_grad()
def input_groups(bc: BlockCalib, projs: dict[str, Proj], first_only: bool = False) -> list[InputGroup]:
    """Group `projs` by the tensor they read (in forward order) and sum X^T X per group over every batch."""
    H: dict[str, torch.Tensor] = {}
    C: dict[str, torch.Tensor] = {}
    n: dict[str, int] = {}
    dense_x: dict[str, torch.Tensor] = {}  # this batch's dense input of each projection
    owner: dict[str, str] = {}  # projection -> the first projection that read the same tensor
    order: list[str] = []
    batch_seen: list[tuple[str, torch.Tensor]] = []

    def make_hook(name: str):
        def hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0]
            same = next((o for o, t in batch_seen if t is x), None)
            if first_only and batch_seen and same is None:
                raise _Stop  # a new input: the first group is complete for this batch
            batch_seen.append((name, x))
            if name not in order:
                order.append(name)
            if same is not None:
                owner.setdefault(name, owner.get(same, same))
            else:
                X = x.reshape(-1, x.shape[-1])  # (tokens, in)
                XtX = bc.gram(X)  # (in, in), fp32
                H[name] = XtX if name not in H else H[name].add_(XtX)
                if bc.dense is not None:
                    XdX = bc.gram(dense_x[name], X)  # (in, in): dense input x pruned input
                    C[name] = XdX if name not in C else C[name].add_(XdX)
                n[name] = n.get(name, 0) + X.shape[0]
            if len(batch_seen) == len(projs):
                raise _Stop  # every hooked projection has its input: the rest of the block is not needed

        return hook

    def keep_dense(name: str):
        def hook(_mod: nn.Module, args: tuple) -> None:
            dense_x[name] = args[0].reshape(-1, args[0].shape[-1])
            if len(dense_x) == len(projs):
                raise _Stop

        return hook

    hooks = [p.module.register_forward_pre_hook(make_hook(name)) for name, p in projs.items()]
    if bc.dense is not None:
        hooks += [bc.twin(p.module).register_forward_pre_hook(keep_dense(name)) for name, p in projs.items()]
    try:
        for i, (x, kw) in enumerate(zip(bc.inputs, bc.kwargs)):
            if bc.dense is not None:
                dense_x.clear()
                try:
                    with bc.compute():
                        bc.dense(bc.dense_inputs[i], **kw)
                except _Stop:
                    pass
            batch_seen.clear()
            try:
                with bc.compute():
                    bc.block.module(x, **kw)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
        batch_seen.clear()
        dense_x.clear()
    groups: dict[str, list[str]] = {}
    for name in order:
        groups.setdefault(owner.get(name, name), []).append(name)
    return [InputGroup(members, H[head], n[head], C.get(head)) for head, members in groups.items()]


def stack_rows(projs: list[Proj]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The weights of projections sharing an input, stacked: (sum of outs, in), with each one's row range."""
    Ws = [p.weight.float() for p in projs]
    spans, r = [], 0
    for W in Ws:
        spans.append((r, r + W.shape[0]))
        r += W.shape[0]
    return torch.cat(Ws, 0), spans

