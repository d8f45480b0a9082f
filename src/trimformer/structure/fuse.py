"""Training-free fusion: fold what removed sublayers did into the kept neighbour before them (FuseGPT's idea)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..models import Anatomy
from ..progress import bar
from .importance import InputStats, least_squares, sublayer_post_norm
from .probe import Probe, silence
from .surgery import assign

Unit = tuple[int, str]  # (block index, 'attn' | 'mlp')


@torch.no_grad()
def fuse_into_neighbours(anatomy: Anatomy, calibration: torch.Tensor, removed: list[Unit], *, windows: int = 32,
                         length: int = 256, batch_size: int = 1, precision: str = "auto", progress: bool = True,
                         may_change: Callable[[int, str], bool] | None = None) -> list[dict[str, Any]]:
    """Fold what the removed sublayers did into the kept neighbour before them.

    Call on the model with nothing removed yet. For every block p that keeps a sublayer and is followed by a gap
    (its own removed sublayer, or whole blocks removed after it), the last kept output projection of p (down_proj
    if its MLP stays, else o_proj) is re-fitted by least squares so that p's output matches the *dense* model's
    hidden state at the end of the gap, given p's inputs in the pruned model. A fusion is kept only when it lowers
    the KL to the dense model on the calibration windows; the weights change in place, the sublayers are not
    removed here. `may_change(p, 'mlp' | 'attn')`: whether that sublayer of block p may be re-fitted (filter_fn);
    a block whose projection may not change is left alone. Returns one record per block tried:
    {'block', 'proj', 'target_block', 'kl_before', 'kl_after', 'kept'}."""
    gone = set(removed)
    L = len(anatomy.blocks)
    whole = {i for i in range(L) if {(i, "attn"), (i, "mlp")} <= gone or
             all((i, k) in gone or getattr(anatomy.blocks[i], "attention" if k == "attn" else "mlp") is None
                 for k in ("attn", "mlp"))}
    probe = Probe(anatomy, calibration[:windows, :length], batch_size=batch_size, precision=precision)
    dense = list(probe.states)  # dense[i]: the dense model's input of block i; dense[L]: after the last block
    hooks = [silence(anatomy.blocks[i], k) for i, k in sorted(gone)]
    log: list[dict[str, Any]] = []
    try:
        probe.refresh(0)
        current = probe.kl_from(0)
        plan = []
        for p in range(L):
            if p in whole:
                continue
            q = p + 1
            while q < L and q in whole:
                q += 1
            b = anatomy.blocks[p]
            if q == p + 1 and not any(u[0] == p for u in gone):
                continue  # nothing removed right after p
            kind = "mlp" if b.mlp is not None and (p, "mlp") not in gone else "attn"
            if may_change is not None and not may_change(p, kind):
                continue
            plan.append((p, q, b.mlp.down if kind == "mlp" else b.attention.o))
        for p, q, proj in bar(plan, desc="fusing removed sublayers", unit="block", disable=not progress):
            st, seen = InputStats(), []
            h = proj.module.register_forward_hook(lambda _m, a, o, seen=seen: seen.append((a[0], o)))
            post = sublayer_post_norm(anatomy.blocks[p], proj)
            try:
                ys = probe.run_block(anatomy.blocks[p], probe.block_inputs(p))
            finally:
                h.remove()
            for (x, yp), y, t in zip(seen, ys, dense[q]):
                error = t.float() - y.float()  # residual stream; behind a post-norm, as a change of proj's output
                st.add(x, error if post is None else post.pull_back(yp, error))
            old = (proj.weight.detach().clone(), proj.bias.detach().clone() if proj.bias is not None else None)
            assign(proj, least_squares(proj, torch.arange(proj.in_features), st, bias=proj.bias is not None))
            kl = probe.kl_from(p)
            kept = kl < current
            log.append({"block": p, "proj": "down" if proj is getattr(anatomy.blocks[p].mlp, "down", None) else "o",
                        "target_block": q, "kl_before": current, "kl_after": kl, "kept": kept})
            if kept:
                current = kl
                probe.refresh(p)
            else:
                assign(proj, old)
    finally:
        for h in hooks:
            h.remove()
    return log
