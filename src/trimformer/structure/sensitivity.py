"""Per-block and per-sublayer sensitivity: what removing each one alone costs, with a plot.

block influence (1 - cos of a block's input and output) for every block, and for decoders the
KL(dense || model without it) of the next-token distributions when one attention or MLP sublayer
is silenced (FinerCut's first step).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models import anatomy_of
from ..progress import bar
from .depth import block_influence
from .probe import silenced


@torch.no_grad()
def sensitivity(model: nn.Module, calibration: torch.Tensor, *, windows: int = 2, length: int = 128,
                progress: bool = True) -> dict[str, Any]:
    """{'block_influence': [L], 'attn_kl': [L] | None, 'mlp_kl': [L] | None}; KL only for pre-norm decoders."""
    an = anatomy_of(model)
    out: dict[str, Any] = {"block_influence": block_influence(an, calibration[:windows], progress)}
    if not (an.causal and all(b.pre_norm for b in an.blocks)):
        out["attn_kl"] = out["mlp_kl"] = None
        return out
    ids = calibration[:windows, :length]
    ref = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)  # (n, T, V)
    for kind in ("attn", "mlp"):
        kls = []
        for b in bar(an.blocks, desc=f"sensitivity {kind}", unit="block", disable=not progress):
            if (b.attention if kind == "attn" else b.mlp) is None:
                kls.append(None)
                continue
            with silenced(b, kind):
                q = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
            kls.append(F.kl_div(q, ref, log_target=True, reduction="sum").item() / ref[..., 0].numel())
        out[f"{kind}_kl"] = kls
    return out


def plot(result: dict[str, Any], path: str | os.PathLike, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = len(result["block_influence"])
    fig, axes = plt.subplots(2 if result.get("attn_kl") else 1, 1, figsize=(8, 6), squeeze=False)
    axes[0, 0].bar(range(L), result["block_influence"])
    axes[0, 0].set_ylabel("block influence (1 - cos)")
    axes[0, 0].set_title(title or "per-block sensitivity")
    if result.get("attn_kl"):
        ax = axes[1, 0]
        x = torch.arange(L).float()
        ax.bar(x - 0.2, [v or 0 for v in result["attn_kl"]], width=0.4, label="attention removed")
        ax.bar(x + 0.2, [v or 0 for v in result["mlp_kl"]], width=0.4, label="MLP removed")
        ax.set_yscale("log")
        ax.set_ylabel("KL to dense")
        ax.set_xlabel("block")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
