"""Mask selection shared by all weight methods: unstructured (per layer or per row) and N:M."""

from __future__ import annotations

import re

import torch


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'unstructured'/None -> None; 'N:M' -> (N, M), N kept of every M consecutive inputs."""
    if pattern in (None, "", "unstructured"):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not m:
        raise ValueError(f"pattern {pattern!r} is neither 'unstructured' nor 'N:M' (e.g. '2:4')")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M (N weights kept of every M), got N={n}, M={mm}")
    return n, mm


def parse_block(pattern: str | None) -> tuple[int, int] | None:
    """'block:RxC' -> (R, C): whole blocks of R output rows x C input columns are removed together."""
    if not str(pattern or "").startswith("block"):
        return None
    m = re.fullmatch(r"block:(\d+)x(\d+)", str(pattern).replace(" ", ""))
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"pattern {pattern!r}: blocks are written 'block:RxC' (rows x input columns), e.g. "
                         "'block:1x4', 'block:4x1', 'block:4x4'")
    return int(m.group(1)), int(m.group(2))


def block_scores(scores: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """Sum scores over blocks of bh rows x bw columns: (out, in) -> (out/bh, in/bw)."""
    out, inp = scores.shape
    if out % bh or inp % bw:
        raise ValueError(f"block {bh}x{bw} does not tile a ({out}, {inp}) weight; pick sizes that divide it")
    return scores.reshape(out // bh, bh, inp // bw, bw).sum((1, 3))  # (out/bh, in/bw)


def block_mask(scores: torch.Tensor, sparsity: float, bh: int, bw: int) -> torch.Tensor:
    """Keep-mask removing the `sparsity` share of blocks with the lowest summed score."""
    s = block_scores(scores, bh, bw)
    keep = ~lowest(s, round(sparsity * s.numel()))
    return keep.repeat_interleave(bh, 0).repeat_interleave(bw, 1)  # (out, in)


def check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1) (the share of weights removed), got {sparsity!r}")


def topk_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Keep-mask removing the `sparsity` share of lowest scores, over the layer or within each row."""
    if per_row:
        n_prune = round(sparsity * scores.shape[1])
        mask = torch.ones_like(scores, dtype=torch.bool)
        if n_prune:
            idx = torch.sort(scores, dim=1, stable=True).indices[:, :n_prune]  # (out, n_prune); sort beats topk here
            mask.scatter_(1, idx, False)
        return mask
    return ~lowest(scores, round(sparsity * scores.numel()))


def lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k lowest entries; ties at the threshold taken in order (kthvalue: far faster than topk for large k)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k <= 0:
        return mask
    flat = score.flatten()
    t = flat.kthvalue(k).values
    mask = flat < t
    need = k - int(mask.sum())
    if need > 0:
        mask[(flat == t).nonzero().flatten()[:need]] = True
    return mask.view_as(score)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the `n` highest scores in every group of `m` consecutive inputs of each row."""
    out, inp = scores.shape
    if inp % m:
        raise ValueError(f"N:M pattern {n}:{m} needs the input width ({inp}) to be a multiple of {m}")
    g = scores.reshape(out, inp // m, m)  # (out, groups, m)
    keep = torch.topk(g, n, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.view(out, inp)


def sparsity_of(t: torch.Tensor) -> float:
    return 1.0 - t.count_nonzero().item() / t.numel()
