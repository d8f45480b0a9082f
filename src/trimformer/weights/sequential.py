"""Hessians X^T X for the projections of one block, shared between projections that read the same input.

q/k/v read one tensor, and so do gate/up: their Hessian is computed once and the layers are solved
together. `input_groups(..., sequential=True)` gives the "true sequential" order of SparseGPT: solve
q/k/v, then o sees the pruned attention, then gate/up, then down. It costs about one block forward in all:

- each pass stops as soon as the stage it collects has its inputs (the q/k/v pass never runs attention);
- once o is solved, the attention's inside (q/k/v, rotary, attention itself) is final, so later passes
  replay it as o applied to o's cached input (calibrate.Shortcut); likewise the MLP once down is solved,
  so the final run that makes the next block's inputs is cheap too. A sublayer is replayed only after a
  check that its output really is its output projection of that input (true of pre-norm decoders; not of
  BERT's post-norm attention, which then simply runs in full).

With a dense stream (calibrate.blocks(dense_targets=True)), each group also gets what fitting its projections
to the dense outputs needs (asymmetric calibration; see SparseGPT.asymmetric): W (C - H), with C = X_dense^T X
the cross-product of the dense model's input with the pruned model's input. Where the group has fewer outputs
than inputs (o, down) that is summed directly as R = sum over batches of ((X_dense - X) W^T)^T X, an (out, in)
matrix (an 8B model's down: 0.23 GB instead of C's 0.82 GB); elsewhere (q/k/v, gate/up) C is summed and the
solver forms W (C - H). The two are equal to fp tolerance (another summation order); W is the group's weight
as it is while its inputs are collected, which is what it still is when the group is solved.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import parallel
from ..calibrate import BlockCalib, Shortcut
from ..models import Block, Proj


class _Stop(Exception):
    pass


@dataclass
class InputGroup:
    """Projections that read one input, with that input's X^T X (summed over calibration tokens)."""

    names: list[str]
    H: torch.Tensor  # (in, in)
    n: int = 0
    C: torch.Tensor | None = None  # (in, in): X_dense^T X, with a dense stream (groups with more outs than ins)
    R: torch.Tensor | None = None  # (sum of outs, in): W (C - H), with a dense stream (the other groups)
    sq: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.sq = torch.diag(self.H)  # sum of x^2 per input channel (Wanda's ||X_j||^2)

    def take(self) -> list[torch.Tensor | None]:
        """[H, C, R], handed over: the group keeps no reference, so whoever solves can free each when done."""
        out = [self.H, self.C, self.R]
        self.H = self.C = self.R = self.sq = None
        return out


def stages(block: Block) -> list[tuple[list[Proj], nn.Module | None]]:
    """The block's projections in forward order, by the input they read: [q, k, v], [o], [gate, up], [down];
    each with the sublayer module its projection's output leaves (for o and down) or None."""
    out: list[tuple[list[Proj], nn.Module | None]] = []
    if block.attention is not None:
        a = block.attention
        out += [([p for k, p in a.projections.items() if k != "o"], None), ([a.o], a.module)]
    if block.mlp is not None:
        m = block.mlp
        out += [([p for p in (m.gate, m.up) if p is not None], None), ([m.down], m.module)]
    return out


@torch.no_grad()
def input_groups(bc: BlockCalib, projs: dict[str, Proj], sequential: bool = False,
                 residual: bool | None = None, dense: set[str] | None = None) -> Iterator[InputGroup]:
    """Group `projs` (full name -> Proj) by the tensor they read, in forward order, with X^T X summed over every
    batch. sequential: collect one stage per pass, after the caller has solved (changed) the stages before it;
    the caller must finish with each yielded group before asking for the next. Otherwise one pass collects all.
    With a dense stream, residual: sum R = W (C - H) (True) or C (False); None: whichever is smaller, per stage;
    dense: the projections that get C or R (None: all; projections that read one input: all of them or none); a
    stage with none of them never reads the dense stream."""
    name_of = {id(p.module): name for name, p in projs.items()}
    plan = [([name_of[id(p.module)] for p in members if id(p.module) in name_of], sub) for members, sub in stages(bc.block)]
    plan = [(names, sub) for names, sub in plan if names]
    missing = set(projs) - {n for names, _ in plan for n in names}
    if missing:
        raise ValueError(f"{', '.join(sorted(missing))}: not a projection of block {bc.block.index}")
    by_residual = set()  # projections whose W (C - H) is summed directly; in one pass always C (a group may span stages)
    for names, _ in plan if sequential else []:
        outs, ins = sum(projs[n].weight.shape[0] for n in names), projs[names[0]].weight.shape[1]
        if residual or (residual is None and outs <= ins):
            by_residual.update(names)
    if not sequential:
        yield from _collect(bc, projs, [n for names, _ in plan for n in names], None, by_residual, dense)
        return
    for names, sub in plan:
        yield from _collect(bc, projs, names, sub, by_residual, dense)


def _collect(bc: BlockCalib, projs: dict[str, Proj], names: list[str], sub: nn.Module | None,
             by_residual: set[str], dense: set[str] | None = None) -> Iterator[InputGroup]:
    """One pass over the calibration batches collecting the inputs of `names`; with `sub` (the sublayer that
    names[0], its output projection, closes), also cache that input and, if valid, shortcut `sub` afterwards.
    With a dense stream: C per input for the projections not in `by_residual`, R per projection for those (only
    for the projections in `dense`, when given)."""
    H: dict[str, torch.Tensor] = {}
    C: dict[str, torch.Tensor] = {}
    R: dict[str, torch.Tensor] = {}
    n: dict[str, int] = {}
    owner: dict[str, str] = {}  # projection -> the first projection that read the same tensor
    seen: list[tuple[str, torch.Tensor]] = []  # this batch's (name, input)
    fitted = set(names) if dense is None else set(names) & dense  # the projections that get C or R
    dense_x = bc.dense_projection_inputs() if bc.dense is not None and fitted else None
    if dense_x is not None:
        bc.drop_dense_weights()  # its stream is cached: only that is read from here on
    batch = 0
    cached = bc.store()  # sub's output projection's input, per batch
    outs: list = []  # sub's output on the first batch, then one None per further batch

    def pre_hook(name: str):
        def hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0]
            same = next((o for o, t in seen if t is x), None)
            seen.append((name, x))
            X = x.reshape(-1, x.shape[-1])  # (tokens, in)
            fit = dense_x is not None and name in fitted
            if fit:
                Xd = dense_x[bc.twin(projs[name].module)][batch].reshape(X.shape)
            if same is not None:
                owner.setdefault(name, owner.get(same, same))
            else:
                H[name] = bc.gram(X) if name not in H else bc.gram(X, out=H[name])  # (in, in), fp32
                if fit and name not in by_residual:  # dense input x pruned input: (in, in)
                    C[name] = bc.gram(Xd, X) if name not in C else bc.gram(Xd, X, out=C[name])
                n[name] = n.get(name, 0) + X.shape[0]
            if fit and name in by_residual:
                R[name] = _residual(projs[name].weight, Xd, X, R.get(name))
            if sub is not None:
                cached.append(x)
            elif len(seen) == len(names):
                raise _Stop  # every projection of the stage has its input: the rest of the block is not needed

        return hook

    def sub_hook(_mod: nn.Module, _args: tuple, out) -> None:
        outs.append(None if outs else out)
        if len(seen) == len(names):
            raise _Stop

    hooks = [projs[name].module.register_forward_pre_hook(pre_hook(name)) for name in names]
    if sub is not None:
        hooks.append(sub.register_forward_hook(sub_hook))
    try:
        for batch, x, kw in bc.batches():  # noqa: B007 (`batch` is read by pre_hook)
            seen.clear()
            try:
                bc.block.module(x, **kw)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
        seen.clear()
    for head in H:  # with several processes: the sums over every process' windows
        parallel.all_reduce_(H[head], C.get(head))
        n[head] = parallel.reduce_sum(n[head])
    parallel.all_reduce_(*R.values())
    if sub is not None:
        shortcut = _shortcut(bc, sub, projs[names[0]].module, cached, outs)
    groups: dict[str, list[str]] = {}
    for name in names:
        if name in H or name in owner:
            groups.setdefault(owner.get(name, name), []).append(name)
    absent = [name for name in names if name not in H and name not in owner]
    if absent:
        raise RuntimeError(f"no calibration input reached {', '.join(absent)}")
    for head, members in groups.items():
        Rs = [R.pop(m) for m in members if m in R]
        group = InputGroup(members, H.pop(head), n[head], C.pop(head, None),
                           (Rs[0] if len(Rs) == 1 else torch.cat(Rs)) if Rs else None)
        del Rs  # the group holds the only references: the solver frees each statistic as it goes
        yield group
        del group
    if sub is not None and shortcut is not None:
        bc.shortcuts.append(shortcut)  # the caller solved sub's output projection: sub's inside is final now


def _shortcut(bc: BlockCalib, sub: nn.Module, out_proj: nn.Module, cached: list[torch.Tensor], outs: list) -> Shortcut | None:
    """A Shortcut for `sub` if its output (first batch) is exactly out_proj(its cached input) and carries nothing else."""
    if len(cached) != len(bc.inputs) or len(outs) != len(bc.inputs):
        return None
    first = outs[0]
    rest = tuple(first[1:]) if isinstance(first, tuple) else None
    if rest is not None and any(r is not None for r in rest):
        return None  # e.g. attention weights: nothing to cache them from
    y = first[0] if isinstance(first, tuple) else first
    with bc.compute():
        if not torch.equal(out_proj(cached[0]), y):
            return None  # the sublayer does more after its projection (post-norm, residual inside)
    return Shortcut(sub, out_proj, cached, rest)


def _residual(W: torch.Tensor, Xd: torch.Tensor, X: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """((X_dense - X) W^T)^T X = W (X_dense^T X - X^T X) for one batch, added to `out` (out, in) if given; fp32.
    The difference first: where the two streams are close it is exact, and W (C - H) would cancel instead."""
    with torch.autocast(X.device.type, enabled=False):
        D = Xd.float() - X.float()  # (tokens, in)
        G = D @ W.t().float()  # (tokens, out): the dense outputs minus the pruned ones, without bias
        del D
        return G.t() @ X.float() if out is None else out.addmm_(G.t(), X.float())


def stack_rows(projs: list[Proj]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The weights of projections sharing an input, stacked: (sum of outs, in), with each one's row range."""
    Ws = [p.weight.float() for p in projs]
    spans, r = [], 0
    for W in Ws:
        spans.append((r, r + W.shape[0]))
        r += W.shape[0]
    return torch.cat(Ws, 0), spans

