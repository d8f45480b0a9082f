"""The Optimal Brain Surgeon update, column by column (SparseGPT, Frantar & Alistarh 2023, arXiv:2301.00774).

Pruning weight q of a row w with Hessian H = X^T X moves the rest of the row by
    delta = -w_q / [H^-1]_qq * H^-1[:, q]        (error w_q^2 / [H^-1]_qq),
the exact least-squares optimum. SparseGPT processes columns left to right, so the inverse Hessian
of the remaining columns is a row of the upper Cholesky factor of H^-1; updates inside a block of
columns are applied at once ("lazy") and the rest of the layer gets one matmul per block.
"""

from __future__ import annotations

import logging

import torch

from .masks import block_scores, lowest

log = logging.getLogger("trimformer.weights")


def lapack_copy(H: torch.Tensor) -> torch.Tensor:
    """A copy of the square H laid out column-major, the layout LAPACK / cuSOLVER factorise in place: handed a
    row-major matrix, torch.linalg.cholesky_ex(A, out=A) works on a column-major copy of it, one more (in, in)
    matrix at the peak (0.8 GB for an 8B model's FFN input). The results are bitwise the same."""
    n = H.shape[-1]
    return torch.empty_strided(H.shape, (1, n), dtype=H.dtype, device=H.device).copy_(H)


def damped_cholesky(H: torch.Tensor, percdamp: float, what: str = "layer") -> tuple[torch.Tensor, float]:
    """Lower Cholesky factor of H + damp*I (damp a share `percdamp` of the mean diagonal; inputs that were always
    zero get a unit diagonal), with more damping, logged, if H is not positive definite; and the share used.
    One matrix besides H: the factor is computed in place (column-major, see `lapack_copy`)."""
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights do not matter
    mean_diag = torch.where(dead, torch.ones_like(H.diagonal()), H.diagonal()).mean()
    damp = percdamp
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for _ in range(8):
        L = lapack_copy(H)
        L.diagonal()[dead] = 1.0
        L.diagonal().add_(damp * mean_diag)
        torch.linalg.cholesky_ex(L, out=(L, info))
        if info == 0:
            return L, damp
        del L
        new = max(damp * 10, 1e-4)
        log.warning("%s: Hessian not positive definite with damping %.0e; retrying with %.0e", what, damp, new)
        damp = new
    raise RuntimeError(f"{what}: Hessian stays singular even with damping {damp:.0e} (calibration data degenerate?)")


def solve_damped_(R: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """R (H + damp I)^-1, in place on R (out, in), for the lower factor L of H + damp I (L L^T; `damped_cholesky`).

    Two triangular solves from the right (Y L^T = R, then X L = Y): torch.cholesky_solve would clone L, one more
    (in, in) matrix at the peak."""
    torch.linalg.solve_triangular(L.mT, R, upper=True, left=False, out=R)
    torch.linalg.solve_triangular(L, R, upper=False, left=False, out=R)
    return R


def inverse_cholesky(H: torch.Tensor, percdamp: float, what: str = "layer", refit: torch.Tensor | None = None) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp*I)^-1 (U^T U = H^-1); more damping, logged, if H is not positive
    definite. Works in place on one (in, in) matrix besides H (an 8B model's FFN input: 0.8 GB, not 4).

    refit: an (out, in) matrix R, overwritten by R (H + damp*I)^-1 with the same factorisation (SparseGPT's
    asymmetric refit), so H is factorised once. If only the inverse's own Cholesky fails, R keeps the solve
    with the damping that did factorise H, and U alone is redone with more damping (from H, which is why H is
    read until U exists)."""
    L, damp = damped_cholesky(H, percdamp, what)
    if refit is not None:
        solve_damped_(refit, L)
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for _ in range(8):
        torch.cholesky_inverse(L, out=L)  # (H + damp)^-1, in place
        torch.linalg.cholesky_ex(L, upper=True, out=(L, info))
        if info == 0:
            return L
        del L
        percdamp = max(damp * 10, 1e-4)
        log.warning("%s: inverse Hessian not positive definite; retrying with damping %.0e", what, percdamp)
        L, damp = damped_cholesky(H, percdamp, what)
    raise RuntimeError(f"{what}: Hessian stays singular even with damping {percdamp:.0e} (calibration data degenerate?)")


@torch.no_grad()
def obs_prune(
    W: torch.Tensor,
    U: torch.Tensor,
    *,
    sparsity: float | list[tuple[int, int, float]] = 0.5,
    nm: tuple[int, int] | None = None,
    block: tuple[int, int] | None = None,
    blocksize: int = 128,
) -> torch.Tensor:
    """Prune W (rows, cols) with OBS updates given U, the upper Cholesky factor of H^-1; returns the new W.

    `sparsity`: share removed, or a list of (row_start, row_stop, share) for row segments that share
    this input (q/k/v stacked) but keep their own per-layer share. `nm`: (N kept, M) instead.
    `block`: (R, C) removes whole blocks of R rows x C columns (score summed over the block, as oBERT's
    block OBS with a diagonal inverse); the OBS update stays exact for the chosen mask.
    The unstructured mask is chosen per block of columns (score w^2 / U_jj^2, lowest removed).
    """
    dtype = torch.promote_types(torch.float32, U.dtype)
    U = U.to(dtype)
    rows, cols = W.shape
    if nm is not None and (cols % nm[1] or blocksize % nm[1]):
        raise ValueError(f"N:M {nm[0]}:{nm[1]} needs the input width ({cols}) and blocksize ({blocksize}) to be multiples of {nm[1]}")
    if block is not None and (blocksize % block[1] or cols % block[1] or rows % block[0]):
        raise ValueError(f"block {block[0]}x{block[1]} must tile the ({rows}, {cols}) weight and blocksize {blocksize}")
    segments = [(0, rows, sparsity)] if isinstance(sparsity, (int, float)) else sparsity
    Wt = W.t().to(dtype, memory_format=torch.contiguous_format, copy=True)  # (cols, rows): a column of W is a contiguous row here (3x faster updates)
    d = torch.diag(U)  # (cols,)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wt[i1:i2]  # (b, rows), a view: updated in place
        U1 = U[i1:i2, i1:i2]  # (b, b)
        Err1 = torch.zeros_like(W1)
        prune = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            score = W1.square() / d[i1:i2, None].square()  # (b, rows): OBS error of removing each weight
            bh, bw = block or (1, 1)
            for r0, r1, share in segments:
                s = block_scores(score[:, r0:r1].t(), bh, bw)  # (seg rows/bh, b/bw)
                low = lowest(s, int(share * s.numel()))
                prune[:, r0:r1] = low.repeat_interleave(bh, 0).repeat_interleave(bw, 1).t()
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:  # choose each N:M group on the already-updated weights
                n, m = nm
                g = W1[i : i + m].square() / d[i1 + i : i1 + i + m, None].square()  # (m, rows)
                prune[i : i + m].scatter_(0, torch.topk(g, m - n, dim=0, largest=False).indices, True)
            err = W1[i] * prune[i] / U1[i, i]  # (rows,): nonzero only where w_i is removed
            W1[i:].addr_(U1[i, i:], err, alpha=-1)  # OBS update of the later columns of the block
            W1[i].masked_fill_(prune[i], 0.0)  # exact zeros (the update leaves rounding residue)
            Err1[i] = err
        Wt[i2:] -= U[i1:i2, i2:].t() @ Err1  # lazy update of every later column at once: (cols-i2, b) @ (b, rows)
    return Wt.t()  # (rows, cols)

