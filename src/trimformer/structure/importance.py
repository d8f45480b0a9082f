"""Importance of prunable groups (FFN neurons, attention heads), and least-squares compensation.

A group is a set of input columns of an output projection (`mlp.down` for a neuron, `attn.o` for
a head). Every criterion is one function `score(W, st, groups) -> (G,)`, higher = keep, in units of
squared output error per token so that groups of different blocks and kinds compare. The statistics they
read (`InputStats`) are collected on calibration blocks (`output_error_stats`) or on a probe (`probe_stats`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch

from .. import calibrate
from ..calibrate import BlockCalib
from ..models import Anatomy, Block, PostNorm, Proj
from .probe import Probe

Criterion = Literal["hessian", "activation", "flap", "magnitude", "taylor", "fisher", "spectral"]  # = IMPORTANCE


@contextmanager
def activation_gradients(model: torch.nn.Module, hooks: list) -> Iterator[None]:
    """Freeze the parameters while inside (only activations' gradients are wanted); remove `hooks` on the way out."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for h in hooks:
            h.remove()
        for p in params:
            p.requires_grad_(True)


def feature_loss(anatomy: Anatomy, batch: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """r . f(x), f the encoder's final features of every token and r ~ N(0, I) drawn from `g`: its mask gradients
    have E_r[m^2] = ||J||^2, the squared change of the features (width's NViT-style importance on encoders)."""
    f = anatomy.model(**calibrate.model_inputs(anatomy, batch)).last_hidden_state.float()  # (B, T, d)
    return (f * torch.randn(f.shape, generator=g).to(f.device)).sum()


@dataclass
class InputStats:
    """What an output projection saw: token count, sum of inputs and X^T X (inputs are (tokens, in))."""

    n: int = 0
    s: torch.Tensor | None = None  # (in,)
    H: torch.Tensor | None = None  # (in, in)
    t: torch.Tensor | None = None  # (in,) sum over tokens of x_c dL/dx_c (gradient criteria only)
    F: torch.Tensor | None = None  # (in, in) sum over tokens of (x * dL/dx)(x * dL/dx)^T
    E: torch.Tensor | None = None  # (out, in) sum over tokens of e x^T, e = dense block output - this block's
    se: torch.Tensor | None = None  # (out,) sum of e (asymmetric refit only)

    def add(self, X: torch.Tensor, error: torch.Tensor | None = None) -> None:
        """Add inputs X; `error`: at the same tokens, the dense model's block output minus this block's."""
        X = X.reshape(-1, X.shape[-1]).float()  # (tokens, in)
        with torch.autocast(X.device.type, enabled=False):  # X^T X never in bf16 (calibrate.BlockCalib.gram)
            s, H = X.sum(0).double(), (X.t() @ X).double()  # products in fp32 (speed), sums in fp64
            if error is not None:
                e = error.reshape(X.shape[0], -1).float()  # (tokens, out)
                se, E = e.sum(0).double(), (e.t() @ X).double()
                self.se = se if self.se is None else self.se + se
                self.E = E if self.E is None else self.E + E
        self.s = s if self.s is None else self.s + s
        self.H = H if self.H is None else self.H + H
        self.n += X.shape[0]

    def add_grad(self, X: torch.Tensor, G: torch.Tensor, per_input: bool = False) -> None:
        """Add inputs X and the gradient G of a loss with respect to them (both (..., in)). per_input: X, G are
        (B, T, in) and a group's mask is one per input (its gradient sums over the T tokens), not one per token."""
        P = X.float() * G.float()  # (..., in): each column's share of its mask gradient
        P = P.sum(1) if per_input else P.reshape(-1, P.shape[-1])  # (B, in) or (tokens, in)
        with torch.autocast(P.device.type, enabled=False):
            t, F = P.sum(0).double(), (P.t() @ P).double()
        self.t = t if self.t is None else self.t + t
        self.F = F if self.F is None else self.F + F

    @property
    def mean(self) -> torch.Tensor:
        return self.s / self.n

    @property
    def second(self) -> torch.Tensor:  # E[x x^T]
        return self.H / self.n


Score = Callable[[torch.Tensor, InputStats | None, list[torch.Tensor]], torch.Tensor]
IMPORTANCE: dict[str, Score] = {}
NEEDS_DATA: set[str] = set()
NEEDS_GRAD: set[str] = set()
LS_DAMP = 1e-2  # ridge on the least-squares refit, relative to the mean input energy


def criterion(name: str, data: bool = True, grad: bool = False) -> Callable[[Score], Score]:
    def deco(fn: Score) -> Score:
        IMPORTANCE[name] = fn
        if data or grad:
            NEEDS_DATA.add(name)
        if grad:
            NEEDS_GRAD.add(name)
        return fn

    return deco


def _col_energy(W: torch.Tensor) -> torch.Tensor:
    return (W.double() ** 2).sum(0)  # (in,) ||W[:, c]||^2


@criterion("magnitude", data=False)
def magnitude(W: torch.Tensor, st: InputStats | None, groups: list[torch.Tensor]) -> torch.Tensor:
    """||W[:, G]||_F^2: calibration-free."""
    e = _col_energy(W)
    return torch.stack([e[g].sum() for g in groups])


@criterion("activation")
def activation(W: torch.Tensor, st: InputStats, groups: list[torch.Tensor]) -> torch.Tensor:
    """Wanda-style: sum over the group's columns of ||W[:, c]||^2 E[x_c^2]."""
    e = _col_energy(W) * st.second.diagonal()
    return torch.stack([e[g].sum() for g in groups])


@criterion("flap")
def flap(W: torch.Tensor, st: InputStats, groups: list[torch.Tensor]) -> torch.Tensor:
    """FLAP (An et al. 2024): fluctuation Var[x_c] ||W[:, c]||^2; the mean goes into the bias."""
    var = (st.second.diagonal() - st.mean**2).clamp(min=0)
    e = _col_energy(W) * var
    return torch.stack([e[g].sum() for g in groups])


@criterion("hessian")
def hessian(W: torch.Tensor, st: InputStats, groups: list[torch.Tensor]) -> torch.Tensor:
    """Structured OBS (Optimal Brain Surgeon for column groups; ZipLM, SlimGPT): the output error left
    after removing group G and re-fitting the other columns by least squares,
    tr(W_G [(H^-1)_GG]^-1 W_G^T).

    Groups of one size are scored together (one batched solve): one per group in a Python loop cost
    ~13 s per FFN of smollm2-135m, most of width's and search's time."""
    Hinv = torch.linalg.inv(damped(st.second))
    Wd = W.double()
    out = Wd.new_empty(len(groups))
    by_size: dict[int, list[int]] = {}
    for j, g in enumerate(groups):
        by_size.setdefault(g.numel(), []).append(j)
    for js in by_size.values():
        idx = torch.stack([groups[j].reshape(-1) for j in js])  # (n, |G|)
        WgT = Wd[:, idx].permute(1, 2, 0)  # (n, |G|, out): W_G^T of each group
        Hgg = Hinv[idx[:, :, None], idx[:, None, :]]  # (n, |G|, |G|): (H^-1)_GG
        if idx.shape[1] == 1:  # single columns: ||W_c||^2 / (H^-1)_cc (a batched solve of 1x1 systems is slow)
            out[js] = (WgT**2).sum((1, 2)) / Hgg[:, 0, 0]
        else:
            out[js] = (WgT * torch.linalg.solve(Hgg, WgT)).sum((1, 2))  # tr(W_G (H^-1)_GG^-1 W_G^T)
    return out


def _need_grad(st: InputStats | None, name: str) -> InputStats:
    if st is None or st.t is None:
        raise ValueError(f"importance {name!r} needs gradient statistics (InputStats.add_grad); "
                         "width collects them when importance is a gradient criterion")
    return st


@criterion("taylor", grad=True)
def taylor(W: torch.Tensor, st: InputStats, groups: list[torch.Tensor]) -> torch.Tensor:
    """First-order Taylor (Molchanov et al. 2019; LLM-Pruner): |change of the loss| when the group's mask
    goes from 1 to 0, |sum over tokens and the group's columns of x_c dL/dx_c|. The loss is block-local
    (see width: next-token cross-entropy of the block's output read through the final norm and head)."""
    t = _need_grad(st, "taylor").t
    return torch.stack([t[g].sum().abs() for g in groups])


@criterion("fisher", grad=True)
def fisher(W: torch.Tensor, st: InputStats, groups: list[torch.Tensor]) -> torch.Tensor:
    """Empirical Fisher of the group's mask (Kwon et al. 2022; NViT's Hessian-aware saliency): half the sum
    over tokens of (sum_{c in G} x_c dL/dx_c)^2, a second-order estimate of the loss change that compares
    across heads, neurons and blocks."""
    F = _need_grad(st, "fisher").F
    return torch.stack([F[g][:, g].sum() / 2 for g in groups])


@criterion("spectral", data=False)
def spectral(W: torch.Tensor, st: InputStats | None, groups: list[torch.Tensor], energy: float = 0.9) -> torch.Tensor:
    """Calibration-free, from the weight's spectrum (in the spirit of PruneNet, Sengupta et al. 2025, which
    keeps the pruned matrix's singular-value distribution close to the original's): a group's share of the
    dominant singular directions, sum over its columns c of sum_{r<=k} (s_r V[c, r])^2, W = U diag(s) V^T,
    k the fewest directions holding `energy` of ||W||_F^2. Over all r this would be the magnitude; the
    cut-off ignores what a column contributes only to the spectrum's tail."""
    _, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)  # S (r,), Vh (r, in)
    cum = (S**2).cumsum(0) / (S**2).sum()
    k = int((cum < energy).sum().item()) + 1
    e = ((S[:k, None] * Vh[:k]) ** 2).sum(0)  # (in,)
    return torch.stack([e[g].sum() for g in groups])


def damped(H: torch.Tensor, rel: float = 1e-2) -> torch.Tensor:
    return H + rel * H.diagonal().mean().clamp(min=1e-8) * torch.eye(H.shape[0], dtype=H.dtype)


def scores(name: str, p: Proj, st: InputStats | None, groups: list[torch.Tensor]) -> torch.Tensor:
    if name not in IMPORTANCE:
        raise ValueError(f"unknown importance {name!r}; choose one of {', '.join(sorted(IMPORTANCE))}")
    return IMPORTANCE[name](p.weight.detach(), st, groups).float()


@torch.no_grad()
def least_squares(p: Proj, keep: torch.Tensor, st: InputStats, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New (out, |keep|) weight (and bias) that best reproduces W x + b from the kept inputs only.

    Solves min ||W x + b - W' x_keep - b'||^2 over the calibration tokens; with `bias`, b' absorbs
    the removed inputs' mean (FLAP's bias compensation falls out as a special case). With the block's output
    error in `st` (st.E), the target is W x + b + e, e = dense block output - this block's output (asymmetric
    refit): the projection also corrects what the cuts before it (in this block and earlier ones) changed.
    """
    W = p.weight.double()  # (out, in)
    d = W.shape[1]
    M, mu = st.second, st.mean
    E = st.E / st.n if st.E is not None else None  # (out, in): E[e x^T]
    if bias:
        # augment x with a constant 1: E[[x;1][x;1]^T]
        M = torch.cat([torch.cat([M, mu[:, None]], 1), torch.cat([mu, mu.new_ones(1)])[None]], 0)  # (d+1, d+1)
        b = p.bias.double() if p.bias is not None else W.new_zeros(W.shape[0])
        W = torch.cat([W, b[:, None]], 1)  # (out, d+1)
        E = torch.cat([E, (st.se / st.n)[:, None]], 1) if E is not None else None  # (out, d+1)
        keep = torch.cat([keep, torch.tensor([d])])
    A = damped(M[keep][:, keep], LS_DAMP)  # (k, k)
    B = W @ M[:, keep] + (E[:, keep] if E is not None else 0)  # (out, k): E[target x_keep^T]
    Wn = torch.linalg.solve(A, B.t()).t()  # (out, k)
    if bias:
        return Wn[:, :-1].float(), Wn[:, -1].float()
    return Wn.float(), None


# -- collecting the statistics ------------------------------------------------------------------
@torch.no_grad()
def output_error_stats(bc: BlockCalib, p: Proj) -> InputStats:
    """Input statistics of `p` over every calibration batch; with a dense stream, also the block's output error
    (dense block on dense inputs minus this block on its inputs) at the same tokens."""
    st = InputStats()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    h = p.module.register_forward_hook(lambda _m, args, out: seen.append((args[0], out)))
    post = sublayer_post_norm(bc.block, p)
    try:
        with bc.compute(), torch.no_grad():
            for i, (x, kw) in enumerate(zip(bc.inputs, bc.kwargs)):
                y = bc.block.module(x, **kw)
                error = None
                xp, yp = seen.pop()
                if bc.dense is not None:
                    yd = bc.dense(bc.dense_inputs[i], **kw)
                    error = (yd[0] if isinstance(yd, tuple) else yd).float() - (y[0] if isinstance(y, tuple) else y).float()
                    if post is not None:  # the residual-stream error, as a change of p's output before the norm
                        error = post.pull_back(yp, error)
                st.add(xp, error)
    finally:
        h.remove()
    return st


def sublayer_post_norm(block: Block, p: Proj) -> PostNorm | None:
    """The norm between output projection `p` (attn.o or mlp.down) and the residual stream, if the block has one."""
    for kind, sub in (("attn", block.attention), ("mlp", block.mlp)):
        if sub is not None and p.module is (sub.o if kind == "attn" else sub.down).module:
            return block.post_norms.get(kind)
    return None


@torch.no_grad()
def probe_stats(probe: Probe, block: Block, proj: Proj | None = None) -> InputStats:
    """Input statistics of the block's down_proj (or `proj`) on the probe's cached inputs of that block."""
    st = InputStats()
    p = proj if proj is not None else block.mlp.down
    h = p.module.register_forward_hook(lambda _m, a, _o: st.add(a[0]))
    try:
        probe.run_block(block, probe.block_inputs(block.index))
    finally:
        h.remove()
    return st
