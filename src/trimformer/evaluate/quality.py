"""Quality against the dense model (BENCHMARK.md P1): perplexity, KL(dense || pruned), top-1 agreement;
embedding fidelity for encoders."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..progress import bar


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), use_cache=False).logits.float()


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, progress: bool = True) -> float:
    """exp(mean NLL over every predicted token); each window (n, T) scored on its own."""
    nll, count = 0.0, 0
    for ids in bar(windows, desc="perplexity", unit="window", disable=not progress):
        ids = ids[None]  # (1, T)
        logits = _logits(model, ids)[0, :-1]  # (T-1, V)
        target = ids[0, 1:].to(logits.device)
        nll += F.cross_entropy(logits, target, reduction="sum").item()
        count += target.numel()
    return math.exp(nll / count)


@torch.no_grad()
def kl_top1(model: nn.Module, reference: nn.Module, windows: torch.Tensor, progress: bool = True) -> dict[str, float]:
    """Mean KL(reference || model) of next-token distributions over every token, and top-1 agreement."""
    kl, agree, count = 0.0, 0, 0
    for ids in bar(windows, desc="KL vs dense", unit="window", disable=not progress):
        ids = ids[None]
        p_log = F.log_softmax(_logits(reference, ids)[0], -1)  # (T, V) dense
        q_log = F.log_softmax(_logits(model, ids)[0], -1)  # (T, V) pruned
        kl += F.kl_div(q_log, p_log, log_target=True, reduction="sum").item()
        agree += (p_log.argmax(-1) == q_log.argmax(-1)).sum().item()
        count += ids.shape[1]
    return {"kl": kl / count, "top1_agree": agree / count}


@torch.no_grad()
def mean_pooled(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sentence embeddings by mean pooling over non-padding tokens (as the MiniLM model card): (B, H)."""
    device = next(model.parameters()).device
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state  # (B, T, H)
    m = mask.to(out.device, out.dtype)[..., None]  # (B, T, 1)
    return (out * m).sum(1) / m.sum(1).clamp(min=1e-9)


@torch.no_grad()
def embedding_fidelity(model: nn.Module, reference: nn.Module, windows: torch.Tensor, progress: bool = True) -> dict[str, float]:
    """Cosine between pruned and dense mean-pooled embeddings: mean and 5th percentile."""
    cos = []
    for ids in bar(windows, desc="embedding cosine", unit="window", disable=not progress):
        a = mean_pooled(reference, ids[None])
        b = mean_pooled(model, ids[None])
        cos.append(F.cosine_similarity(a, b).item())
    t = torch.tensor(cos)
    return {"cos_mean": t.mean().item(), "cos_p5": t.quantile(0.05).item()}
