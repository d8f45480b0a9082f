"""Hidden channels (the embedding dimension, NViT's "EMB" group): their importance, cost and removal.

A hidden channel c is one coordinate of the residual stream. Removing it takes away, in every block, the
column c of each projection that reads the stream (q, k, v, gate, up, fc1), the row c of each that writes
it (o, down, fc2, with the bias), entry c of every norm and layer scale; outside the blocks, channel c of the
embedding or patch embedding, of [CLS] / mask / register tokens and position embeddings, of the final norm,
and the column c of the head. `config.hidden_size` shrinks by one for every block alike.

Importance (`channel_scores`): a mask m_c on channel c of everything written to the stream (the embedding
output and each sublayer's output) scales the whole channel; m_c = 0 removes it. Its gradient is the sum over
tokens and write points of x_c dL/dx_c, summed over write points, and `fisher` keeps, like width.py does for
heads and neurons, half the sum over inputs of its square; `taylor` the absolute value of its sum. The loss is
the one width.py uses on the model's whole output: for an encoder r . f(x), f the final features and r ~ N(0, I)
drawn from the same seed, so channels, heads and neurons compare in one unit and compete in one budget; for a
causal LM, the next-token cross-entropy of the whole model (heads and neurons read a block-local loss there,
so a joint budget mixes two estimates of the same loss).

Approximation: the mask leaves a zero in the channel, the removal takes it out of every norm. RMSNorm stays
exact for a zero channel (the weight is rescaled by sqrt(d / d') and eps by d / d': the mean square over d'
channels), LayerNorm does not (its mean and variance over d' channels differ from those over d with zeros), and
neither does a channel that still carried signal: the scores are first order in the removed channels. Measured on
dinov2-s (benchmarks/p4_channel_norms.py, 32 views, [CLS]): cutting its 24 / 48 / 96 least important channels,
the features with the channels zeroed in the stream (norms over 384) and with them removed (norms over the rest)
agree to cosine 0.982 / 0.961 / 0.901, and against dense the removal loses 0.011 / 0.044 / 0.061 of cosine more
than the zeroing (0.938 vs 0.949, 0.838 vs 0.882, 0.703 vs 0.764).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..models import Anatomy, Proj
from ..progress import bar
from .importance import activation_gradients, feature_loss
from .surgery import SurgeryError, keep_inputs, keep_outputs, kept_index, new_param, sync_config

READS = ("attn.q", "attn.k", "attn.v", "attn.qkv", "mlp.gate", "mlp.up")  # projections whose inputs are the stream
WRITES = ("attn.o", "mlp.down")


def check(anatomy: Anatomy) -> None:
    """Refuse what the mask gradient does not describe (post-norm blocks: the stream is normalised after the add)
    and what would not reload the same (see `scaled_embedding`)."""
    if not all(b.pre_norm for b in anatomy.blocks):
        raise ValueError(f"parts=hidden needs a pre-norm model; {anatomy.family} normalises the residual stream "
                         "after each block (drop 'hidden' from parts)")
    if why := scaled_embedding(anatomy):
        raise ValueError(why)


def scaled_embedding(anatomy: Anatomy) -> str:
    """Why a narrower stream would reload wrong, or '': Gemma's embeddings are multiplied by sqrt(hidden_size),
    which transformers recomputes from the config when it loads the checkpoint."""
    if getattr(anatomy.embed, "embed_scale", None) is None:
        return ""
    return (f"parts=hidden on {anatomy.family}: its embeddings are scaled by sqrt(hidden_size), which transformers "
            "recomputes from the config on reload, so a narrower stream would reload with another scale (drop "
            "'hidden' from parts)")


# -- cost ----------------------------------------------------------------------------------------
def channel_params(anatomy: Anatomy) -> float:
    """Parameters one hidden channel holds (what `prune_channels` removes per channel)."""
    d = anatomy.hidden_size
    n = 0.0
    in_blocks = {id(m) for b in anatomy.blocks for m in b.module.modules()}
    for b in anatomy.blocks:
        for short, p in b.projections().items():
            n += p.out_features if short in READS else p.in_features + (p.bias is not None)
        for m in [*b.norms.values(), *b.scales.values()]:
            n += sum(t.numel() // d for t in m.parameters(recurse=False))
    for _, m, kind in _outside(anatomy, in_blocks):
        if kind == "head":
            n += 0 if anatomy.tied else m.out_features
        elif kind == "embedding":
            n += m.num_embeddings
        elif kind == "patch":
            n += m.weight[0].numel() + (m.bias is not None)
        elif kind == "linear":
            n += m.out_features
        for pname, prm in m.named_parameters(recurse=False):
            if (kind == "norm" or (kind == "other" and pname not in ("weight", "bias"))) and prm.shape[-1] == d:
                n += prm.numel() // d
    return n


def channel_matmul(anatomy: Anatomy) -> float:
    """Weights multiplied per token that one hidden channel holds (costs.matmul_params' unit)."""
    n = sum(p.out_features if short in READS else p.in_features for b in anatomy.blocks
            for short, p in b.projections().items())
    return float(n + (anatomy.head.out_features if anatomy.head is not None else 0))


def channel_cost(anatomy: Anatomy, kind: str) -> float:
    return channel_params(anatomy) if kind == "params" else channel_matmul(anatomy)


# -- importance ----------------------------------------------------------------------------------
def channel_scores(anatomy: Anatomy, calibration: torch.Tensor, batch_size: int, importance: str,
                   progress: bool = False) -> torch.Tensor:
    """(d,) importance of each hidden channel, higher = keep (module docstring); `importance` fisher or taylor."""
    if importance not in ("fisher", "taylor"):
        raise ValueError(f"parts=hidden scores channels by their mask gradient: use importance=fisher (or taylor on a "
                         f"causal LM), not {importance!r}")
    check(anatomy)
    an = anatomy
    if not an.causal and importance == "taylor":
        raise ValueError("importance 'taylor' on an encoder: a random projection of the features has a zero mean "
                         "gradient; use importance=fisher")
    if an.causal and an.head is None:
        raise ValueError("parts=hidden on a causal LM needs its head (the next-token loss)")
    seen: list[torch.Tensor] = []

    def first(_m, args, kwargs):  # block 0's input: the embedding's write to the stream
        x = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
        seen.append(x)
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    def write(_m, _a, out):
        y = out[0] if isinstance(out, tuple) else out
        y.retain_grad()
        seen.append(y)

    hooks = [an.blocks[0].module.register_forward_pre_hook(first, with_kwargs=True)]
    for b in an.blocks:
        for part, proj in (("attn", b.attention.o if b.attention else None), ("mlp", b.mlp.down if b.mlp else None)):
            if proj is not None:  # a post norm (Gemma) sits between the projection and the stream
                hooks.append((b.post_norms[part].module if part in b.post_norms else proj.module).register_forward_hook(write))
    g = torch.Generator().manual_seed(0)  # width.py's draws: the same r for the same batches
    device = next(an.model.parameters()).device
    t = torch.zeros(an.hidden_size, dtype=torch.float64)
    F = torch.zeros(an.hidden_size, dtype=torch.float64)
    with activation_gradients(an.model, hooks):
        for i in bar(range(0, calibration.shape[0], batch_size), desc="width: channel gradients", unit="batch",
                     disable=not progress):
            batch = calibration[i: i + batch_size].to(device)
            with torch.enable_grad():
                if an.causal:
                    logits = an.model(input_ids=batch).logits[:, :-1].float()  # (B, T-1, V)
                    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                      batch[:, 1:].reshape(-1), reduction="sum").backward()
                else:
                    feature_loss(an, batch, g).backward()
            m = sum((y.detach().float() * y.grad.float()) for y in seen)  # (B, T, d): every write's share
            m = m.reshape(-1, m.shape[-1]) if an.causal else m.sum(1)  # masks per token (LM) or per input
            t += m.sum(0).double().cpu()
            F += m.pow(2).sum(0).double().cpu()
            seen.clear()
    return F / 2 if importance == "fisher" else t.abs()


# -- surgery -------------------------------------------------------------------------------------
def _outside(anatomy: Anatomy, in_blocks: set[int]):
    """(name, module, kind) of every module outside the blocks that holds the stream's channels."""
    d, head = anatomy.hidden_size, anatomy.head
    for name, m in anatomy.model.named_modules():
        if id(m) in in_blocks or m is anatomy.model:
            continue
        if m is head:
            yield name, m, "head"
        elif isinstance(m, nn.Embedding) and m.embedding_dim == d:
            yield name, m, "embedding"
        elif isinstance(m, nn.Conv2d) and m.out_channels == d:  # ViT patch embedding
            yield name, m, "patch"
        elif isinstance(m, nn.Linear) and m.in_features == d:  # pooler, classifier
            yield name, m, "linear"
        elif _is_norm(m, d):
            yield name, m, "norm"
        else:
            yield name, m, "other"  # [CLS] / mask / register tokens, position embeddings


@torch.no_grad()
def prune_channels(anatomy: Anatomy, keep: Sequence[int] | torch.Tensor) -> None:
    """Keep hidden channels `keep` everywhere the residual stream is read or written (module docstring), and make
    `model.config` say so. `model.trimformer_channels` (d',) records which channels of the original model are left
    (over successive cuts): a dense teacher's features are compared on those.

    RMSNorm models stay exact when the removed channels carried nothing (the norm weight is
    rescaled by sqrt(d/d') and its eps by d/d'); LayerNorm statistics change by construction.
    """
    if why := scaled_embedding(anatomy):
        raise SurgeryError(why)
    d = anatomy.hidden_size
    idx = kept_index(keep, d, "hidden channels")
    if idx.numel() == 0:
        raise SurgeryError("cannot keep 0 hidden channels")
    model = anatomy.model
    before = getattr(model, "trimformer_channels", None)
    model.trimformer_channels = (torch.arange(d) if before is None else before)[idx]
    in_blocks = {id(m) for b in anatomy.blocks for m in b.module.modules()}
    normed: set[int] = set()
    for b in anatomy.blocks:
        for short, p in b.projections().items():
            (keep_inputs if short in READS else keep_outputs)(p, idx)
        for norm in b.norms.values():
            _norm(norm, idx, d)
            normed.add(id(norm))
        for scale in b.scales.values():  # DINOv2 / CaiT layer scale: one factor per channel
            for pname, prm in list(scale.named_parameters(recurse=False)):
                setattr(scale, pname, new_param(prm, prm[..., idx]))
    head = anatomy.head
    for name, m, kind in list(_outside(anatomy, in_blocks)):
        if kind == "head":
            if not anatomy.tied:
                keep_inputs(Proj(m, name), idx)
        elif kind == "embedding":
            m.weight = new_param(m.weight, m.weight[:, idx])
            m.embedding_dim = idx.numel()
        elif kind == "patch":
            m.weight = new_param(m.weight, m.weight[idx])
            if m.bias is not None:
                m.bias = new_param(m.bias, m.bias[idx])
            m.out_channels = idx.numel()
        elif kind == "linear":
            keep_inputs(Proj(m, name), idx)
        elif kind == "norm":
            _norm(m, idx, d)
            normed.add(id(m))
        else:
            for pname, prm in list(m.named_parameters(recurse=False)):
                if pname not in ("weight", "bias") and prm.shape[-1] == d:
                    setattr(m, pname, new_param(prm, prm[..., idx]))
    if anatomy.tied and head is not None:
        head.weight = anatomy.embed.weight
        if isinstance(head, nn.Linear):
            head.in_features = idx.numel()
    for m in model.modules():  # sizes some modules keep as plain attributes
        for key in ("hidden_size", "embed_dim"):
            if getattr(m, key, None) == d and not isinstance(getattr(m, key), bool):
                setattr(m, key, idx.numel())
    anatomy.hidden_size = idx.numel()
    eps = {m.variance_epsilon for m in model.modules() if id(m) in normed and hasattr(m, "variance_epsilon")}
    if len(eps) == 1 and hasattr(anatomy.config, "rms_norm_eps"):  # the stream's RMSNorms rebuild from the config
        anatomy.config.rms_norm_eps = eps.pop()
    sync_config(anatomy)  # hidden_size: the next anatomy_of reads it


def _is_norm(m: nn.Module, d: int) -> bool:
    w = getattr(m, "weight", None)
    return (isinstance(m, nn.LayerNorm) or "Norm" in type(m).__name__) and w is not None and w.shape == (d,)


def _norm(m: nn.Module, idx: torch.Tensor, d: int) -> None:
    keep = idx.numel()
    rms = not isinstance(m, nn.LayerNorm) and hasattr(m, "variance_epsilon")
    if getattr(m, "weight", None) is not None:
        w = m.weight[idx] * ((d / keep) ** 0.5 if rms else 1.0)
        m.weight = new_param(m.weight, w)
    if getattr(m, "bias", None) is not None:
        m.bias = new_param(m.bias, m.bias[idx])
    if rms:
        m.variance_epsilon = m.variance_epsilon * d / keep
    if isinstance(m, nn.LayerNorm):
        m.normalized_shape = (keep,)
