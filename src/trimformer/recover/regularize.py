"""Sparse then prune: group lasso on the groups a width cut removes, during recovery training.

A group is what structured pruning takes out together: an FFN neuron j (row j of up and gate, column j
of down) or a query head h (its head_dim rows of q, its columns of o). The penalty is lambda * sum_g ||W_g||_2,
the L1 norm of the group norms (Yuan & Lin, 2006), applied as its proximal step after every optimizer step:

    W_g <- W_g * max(0, 1 - lr * lambda / ||W_g||_2)

so weak groups reach exactly zero and a later width cut (importance 'magnitude') removes them at no cost
(Adam's per-weight scaling would blur a penalty gradient; the proximal step does not depend on it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models import Anatomy
from .loop import Callback, Run


class GroupLasso(Callback):
    """Views of every group's tensors, per block and part ('ffn', 'heads'); `norms()` and the proximal step
    `shrink_(lr)`, taken after every optimizer step at the learning rate of the next."""

    def __init__(self, anatomy: Anatomy, parts: Sequence[str], strength: float):
        """Groups whose tensors are not all trained (frozen on entry) are left alone."""
        self.strength = strength
        # (key, [(tensor view whose dim 0 indexes the groups, (G, ...))])
        self.groups: list[tuple[str, list[torch.Tensor]]] = []
        for b in anatomy.blocks:
            if "ffn" in parts and b.mlp is not None:
                m = b.mlp
                views = [m.up.weight, m.down.weight.t()]  # (F, H) each
                views += [m.gate.weight] if m.gate is not None else []
                views += [p.bias for p in (m.up, m.gate) if p is not None and p.bias is not None]  # (F,)
                self.groups.append((f"{b.index}.ffn", views))
            if "heads" in parts and b.attention is not None:
                a = b.attention
                nh, d = a.num_heads, a.head_dim
                q = a.q if a.q is not None else a.qkv
                Wq = q.weight[: nh * d]  # (nh*d, H): fused qkv rows are [q | k | v]
                views = [Wq.reshape(nh, d, -1), a.o.weight.t().reshape(nh, d, -1)]  # (nh, d, H) each
                if q.bias is not None:
                    views.append(q.bias[: nh * d].reshape(nh, d))
                self.groups.append((f"{b.index}.heads", views))
        self.groups = [(k, views) for k, views in self.groups if all(_root(v).requires_grad for v in views)]

    def after_step(self, run: Run) -> None:
        self.shrink_(run.opt.param_groups[0]["lr"])

    @torch.no_grad()
    def norms(self) -> dict[str, torch.Tensor]:
        """Group norms by '<block>.ffn' / '<block>.heads': (G,) each."""
        return {k: sum(v.float().pow(2).reshape(v.shape[0], -1).sum(1) for v in views).sqrt()
                for k, views in self.groups}

    @torch.no_grad()
    def shrink_(self, lr: float) -> None:
        norms = self.norms()
        for k, views in self.groups:
            scale = (1.0 - lr * self.strength / norms[k].clamp(min=1e-12)).clamp(min=0.0)  # (G,)
            for v in views:
                v.mul_(scale.to(v.dtype).reshape(-1, *([1] * (v.dim() - 1))))

    def summary(self) -> dict:
        norms = self.norms()
        return {"penalty": self.strength * sum(n.sum().item() for n in norms.values()),
                "zero_groups": {k: int((n == 0).sum()) for k, n in norms.items()}}


def _root(v: torch.Tensor) -> torch.Tensor:
    return v if v._base is None else v._base
