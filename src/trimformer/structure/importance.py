"""Importance of prunable groups (FFN neurons, attention heads), and least-squares compensation.

A group is a set of input columns of an output projection (`mlp.down` for a neuron, `attn.o` for
a head). Every criterion is one function `score(W, st, groups) -> (G,)`, higher = keep, in units of
squared output error per token so that groups of different blocks and kinds compare.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models import Proj


@dataclass
class InputStats:
    """What an output projection saw: token count, sum of inputs and X^T X (inputs are (tokens, in))."""

    n: int = 0
    s: torch.Tensor | None = None  # (in,)
    H: torch.Tensor | None = None  # (in, in)

    def add(self, X: torch.Tensor) -> None:
        X = X.reshape(-1, X.shape[-1]).float()  # (tokens, in)
        s, H = X.sum(0).double(), (X.t() @ X).double()  # products in fp32 (speed), sums in fp64
        self.s = s if self.s is None else self.s + s
        self.H = H if self.H is None else self.H + H
        self.n += X.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.s / self.n

    @property
    def second(self) -> torch.Tensor:  # E[x x^T]
        return self.H / self.n


Score = Callable[[torch.Tensor, InputStats | None, list[torch.Tensor]], torch.Tensor]
IMPORTANCE: dict[str, Score] = {}
NEEDS_DATA: set[str] = set()
LS_DAMP = 1e-2  # ridge on the least-squares refit, relative to the mean input energy


def criterion(name: str, data: bool = True) -> Callable[[Score], Score]:
    def deco(fn: Score) -> Score:
        IMPORTANCE[name] = fn
        if data:
            NEEDS_DATA.add(name)
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
    tr(W_G [(H^-1)_GG]^-1 W_G^T)."""
    Hinv = torch.linalg.inv(damped(st.second))
    Wd = W.double()
    out = []
    for g in groups:
        Wg = Wd[:, g]  # (out, |G|)
        out.append(torch.trace(Wg @ torch.linalg.solve(Hinv[g][:, g], Wg.t())))
    return torch.stack(out)


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
    the removed inputs' mean (FLAP's bias compensation falls out as a special case).
    """
    W = p.weight.double()  # (out, in)
    d = W.shape[1]
    M, mu = st.second, st.mean
    if bias:
        # augment x with a constant 1: E[[x;1][x;1]^T]
        M = torch.cat([torch.cat([M, mu[:, None]], 1), torch.cat([mu, mu.new_ones(1)])[None]], 0)  # (d+1, d+1)
        b = p.bias.double() if p.bias is not None else W.new_zeros(W.shape[0])
        W = torch.cat([W, b[:, None]], 1)  # (out, d+1)
        keep = torch.cat([keep, torch.tensor([d])])
    A = damped(M[keep][:, keep], LS_DAMP)  # (k, k)
    B = W @ M[:, keep]  # (out, k)
    Wn = torch.linalg.solve(A, B.t()).t()  # (out, k)
    if bias:
        return Wn[:, :-1].float(), Wn[:, -1].float()
    return Wn.float(), None
