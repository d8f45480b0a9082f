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
def log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities, float32: (T, V) for one window (T,), (n, T, V) for a batch (n, T). What
    KL and top-1 are computed from; benchmarks also keep them, or hand them to an engine's check."""
    logp = F.log_softmax(_logits(model, ids if ids.dim() == 2 else ids[None]), -1)  # (n, T, V)
    return logp if ids.dim() == 2 else logp[0]


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


def compare(logp: torch.Tensor, ref_logp: torch.Tensor) -> tuple[float, int]:
    """(sum over tokens of KL(reference || model), tokens whose argmax agree) for log-probabilities (T, V)."""
    kl = F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
    return kl, int((ref_logp.argmax(-1) == logp.argmax(-1)).sum().item())


@torch.no_grad()
def kl_top1(model: nn.Module, reference: nn.Module, windows: torch.Tensor, progress: bool = True) -> dict[str, float]:
    """Mean KL(reference || model) of next-token distributions over every token, and top-1 agreement."""
    kl, agree, count = 0.0, 0, 0
    for ids in bar(windows, desc="KL vs dense", unit="window", disable=not progress):
        p_log = log_probs(reference, ids)  # (T, V) dense
        q_log = log_probs(model, ids)  # (T, V) pruned
        k, a = compare(q_log, p_log)
        kl, agree, count = kl + k, agree + a, count + ids.numel()
    return {"kl": kl / count, "top1_agree": agree / count}


class Reference:
    """The dense model's next-token log-probabilities on fixed windows, computed once, so that many pruned
    models are scored against it without re-running the dense model (benchmarks compare several rows).
    `dtype`: how they are kept (float16 halves the memory: 16 x 512 tokens x 49k vocabulary is 1.6 GB in fp32)."""

    def __init__(self, reference: nn.Module, windows: torch.Tensor, dtype: torch.dtype = torch.float32,
                 progress: bool = False):
        self.windows = windows
        with torch.no_grad():
            self.logp = [log_probs(reference, w).to(dtype)
                         for w in bar(windows, desc="dense log-probs", unit="window", disable=not progress)]

    @torch.no_grad()
    def score(self, model: nn.Module, progress: bool = False) -> dict[str, float]:
        """KL(dense || model), top-1 agreement and perplexity on the windows, one forward of `model` each."""
        kl, agree, nll, count = 0.0, 0, 0.0, 0
        for w, p in bar(list(zip(self.windows, self.logp)), desc="KL vs dense", unit="window", disable=not progress):
            q = log_probs(model, w)  # (T, V)
            k, a = compare(q, p.float())
            nll += F.nll_loss(q[:-1], w[1:].to(q.device), reduction="sum").item()
            kl, agree, count = kl + k, agree + a, count + w.numel()
        return {"kl": kl / count, "top1_agree": agree / count, "ppl": math.exp(nll / (count - len(self.windows)))}


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
