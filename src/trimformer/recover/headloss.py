"""KL and LM loss straight from the last hidden states, a chunk of tokens at a time.

With a 49K vocabulary the logits dominate training memory: student and teacher logits, their log-softmax,
the KL terms and their gradients are each (B, T, V) floats. Here the head is applied to `chunk` tokens at a
time, the loss *and its gradient* are computed in the same pass (d loss / d logits has a closed form), and
only the gradient with respect to the hidden states (N, H) is kept for backward. Neither model's logits
ever exist whole, and nothing is recomputed (the idea of fused linear cross-entropy kernels).

d [T^2 KL(p_t || softmax(z/T))] / dz = T (softmax(z/T) - p_t);   d CE(softmax(z), y) / dz = softmax(z) - onehot(y).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _HeadLoss(torch.autograd.Function):
    """(loss, kl, lm) with loss = kl_w * kl + lm_w * lm; only `loss` has a gradient."""

    @staticmethod
    def forward(ctx, hs, W, b, ht, Wt, bt, targets, T: float, kl_w: float, lm_w: float, chunk: int):
        N = hs.shape[0]
        n_lm = max(int((targets >= 0).sum()), 1)
        need_W, need_b = ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2]
        g_hs = torch.empty_like(hs)
        g_W = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if need_W else None
        g_b = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if need_b else None
        kl = torch.zeros((), dtype=torch.float32, device=hs.device)
        lm = torch.zeros((), dtype=torch.float32, device=hs.device)
        Wf = W.float()
        for i in range(0, N, chunk):
            h = hs[i:i + chunk]  # (c, H)
            z = F.linear(h, W, b).float()  # (c, V)
            g_z = torch.zeros_like(z)
            if kl_w:
                ls = F.log_softmax(z / T, -1)
                lt = F.log_softmax(F.linear(ht[i:i + chunk], Wt, bt).float() / T, -1)
                pt = lt.exp()
                kl += (pt * (lt - ls)).sum() * T**2
                g_z += (kl_w * T / N) * (ls.exp_() - pt)
                del ls, lt, pt
            if lm_w:
                y = targets[i:i + chunk]  # (c,), -1 where no next token exists
                valid = y >= 0
                p = F.log_softmax(z, -1)
                lm -= p[valid].gather(1, y[valid, None]).sum()
                p.exp_()
                p[valid.nonzero()[:, 0], y[valid]] -= 1.0
                g_z += (lm_w / n_lm) * p * valid[:, None]
                del p
            g_hs[i:i + chunk] = (g_z @ Wf).to(hs.dtype)  # (c, H)
            if need_W:
                g_W += g_z.t() @ h.float()  # (V, H)
            if need_b:
                g_b += g_z.sum(0)
            del z, g_z
        ctx.save_for_backward(g_hs, g_W, g_b)
        ctx.dtypes = (W.dtype, None if b is None else b.dtype)
        kl, lm = kl / N, lm / n_lm
        ctx.mark_non_differentiable(kl, lm)
        return kl_w * kl + lm_w * lm, kl, lm

    @staticmethod
    def backward(ctx, d_loss, _d_kl, _d_lm):
        g_hs, g_W, g_b = ctx.saved_tensors
        gW = None if g_W is None else (g_W * d_loss).to(ctx.dtypes[0])
        gb = None if g_b is None else (g_b * d_loss).to(ctx.dtypes[1])
        return (g_hs * d_loss.to(g_hs.dtype), gW, gb) + (None,) * 8


def fusable(head: nn.Module | None) -> bool:
    """A plain linear head (what every supported decoder has) can be fused; anything else gets full logits."""
    return type(head) is nn.Linear


def head_loss(hs: torch.Tensor, head: nn.Linear, ht: torch.Tensor | None, t_head: nn.Linear | None,
              ids: torch.Tensor, temperature: float = 1.0, kl_weight: float = 1.0, lm_weight: float = 0.0,
              chunk: int = 128) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`hs`, `ht`: last hidden states (B, T, H) of student and teacher, before their heads; `ids` (B, T).

    Returns kl_weight * KL + lm_weight * LM (a scalar with a gradient) and the unweighted terms (detached).
    KL: T^2 KL(teacher || student) at temperature T, mean over the B*T tokens; LM: next-token cross-entropy,
    mean over the B*(T-1) tokens that have a next token. A zero weight skips its term (ht may then be None).
    """
    B, T_, H = hs.shape  # (B, T, H)
    targets = torch.cat([ids[:, 1:], ids.new_full((B, 1), -1)], 1).reshape(-1).to(hs.device)  # (B*T,)
    if ht is None:
        if kl_weight:
            raise ValueError("the KL term needs the teacher's hidden states")
        ht, t_head = hs.detach(), head
    loss, kl, lm = _HeadLoss.apply(
        hs.reshape(B * T_, H), head.weight, head.bias, ht.reshape(B * T_, -1).to(hs.device),
        t_head.weight.detach().to(hs.device), None if t_head.bias is None else t_head.bias.detach().to(hs.device),
        targets, float(temperature), float(kl_weight), float(lm_weight), int(chunk),
    )
    return loss, {"kl": kl, "lm": lm}
