"""Merge-aware distillation: fine-tune an encoder with token merging ON, towards its own dense embeddings.

ToMe (Bolya et al., 2023) reports that fine-tuning with merging active recovers most of what training-free
merging loses. Here the student is the model itself inside `tokens.prune(model, method)` (the merged
forward is differentiable: only the plan, which tokens go where, is made under no_grad); the targets are
the mean-pooled embeddings of the same model before training, without merging, computed once.

loss: '+'-joined terms: 'cos' (1 - cosine to the dense embedding), 'mse' (of the L2-normalized
embeddings, times the hidden size), 'sim' (MSE between the batch's cosine-similarity matrices, pruned vs
dense: keeps the neighbourhood structure that nearest-neighbour search reads), 'rank' (KL between each
row's softmax over the batch's similarities at temperature `tau`, dense || pruned: sharpest on the
nearest neighbours). train: 'all' (every parameter), 'blocks', 'norms' (LayerNorms and biases), or
'lora' (rank-`lora_rank` adapters on the block projections via recover/lora.py, merged at the end).
The method's schedule is untouched: training changes what merges (hidden features), never how many
under a fixed `keep` / `flops`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models import anatomy_of
from ..progress import bar
from ..recover import lora as lora_mod
from ..recover.train import _schedule
from . import TokenPruner, build, prune

TERMS = ("cos", "mse", "sim", "rank")
TRAIN = ("all", "blocks", "norms", "lora")


@dataclass
class DistillConfig:
    steps: int = 200
    batch_size: int = 16
    lr: float | None = None  # None: 3e-5 for 'all' / 'blocks', 1e-3 for 'norms' and 'lora'
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    loss: str = "cos+sim"
    sim_weight: float = 1.0
    rank_weight: float = 1.0
    tau: float = 0.05
    train: str = "all"
    lora_rank: int = 8
    max_minutes: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("steps", "batch_size", "lora_rank"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"{f} must be a positive integer, got {getattr(self, f)!r}")
        terms = self.terms  # (validates the spec)
        if self.batch_size < 2 and {"sim", "rank"} & set(terms):
            raise ValueError("the 'sim' and 'rank' terms compare paragraphs within a batch: batch_size must be >= 2")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0 (or None for the default), got {self.lr}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0 (a softmax temperature), got {self.tau}")
        if self.train not in TRAIN:
            raise ValueError(f"train must be one of {', '.join(TRAIN)}, got {self.train!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0 (or None: no time limit), got {self.max_minutes}")

    @property
    def terms(self) -> tuple[str, ...]:
        terms = tuple(t.strip() for t in self.loss.split("+") if t.strip())
        bad = [t for t in terms if t not in TERMS]
        if not terms or bad:
            raise ValueError(f"loss {self.loss!r}: use '+'-joined terms from {', '.join(TERMS)} (e.g. 'cos+sim')")
        return terms

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.train in ("norms", "lora") else 3e-5)


def pooled(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean-pooled last hidden states (B, H), differentiable (evaluate.quality.mean_pooled is no_grad)."""
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
    m = mask.to(out.dtype)[..., None]  # (B, T, 1)
    return (out * m).sum(1) / m.sum(1).clamp(min=1e-9)


def distill_loss(e: torch.Tensor, target: torch.Tensor, cfg: DistillConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """e, target (B, H): pruned and dense embeddings of one batch."""
    es, et = F.normalize(e.float(), dim=-1), F.normalize(target.float(), dim=-1)
    parts: dict[str, torch.Tensor] = {}
    terms = cfg.terms
    if "cos" in terms:
        parts["cos"] = (1.0 - (es * et).sum(-1)).mean()
    if "mse" in terms:
        parts["mse"] = F.mse_loss(es, et) * es.shape[-1]
    S, St = es @ es.T, et @ et.T  # (B, B)
    off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    if "sim" in terms:
        parts["sim"] = cfg.sim_weight * F.mse_loss(S[off], St[off]) * 100.0  # cosines differ by ~0.1: scale to ~cos
    if "rank" in terms:
        logit = (S / cfg.tau).masked_fill(~off, -1e4)  # a row's own paragraph is not a neighbour
        logit_t = (St / cfg.tau).masked_fill(~off, -1e4)
        parts["rank"] = cfg.rank_weight * F.kl_div(logit.log_softmax(-1), logit_t.log_softmax(-1), log_target=True,
                                                   reduction="batchmean")
    loss = sum(parts.values())
    return loss, {k: v.item() for k, v in parts.items()}


def _batch(data: list[torch.Tensor], rows: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [data[int(r)] for r in rows]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)  # (B, T) right-padded
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for j, s in enumerate(seqs):
        ids[j, :len(s)], mask[j, :len(s)] = s, 1
    return ids, mask


def _trainable(model: nn.Module, train: str, blocks_path: str) -> dict[str, nn.Parameter]:
    named = dict(model.named_parameters())
    if train == "all":
        return named
    if train == "blocks":
        return {n: p for n, p in named.items() if n.startswith(blocks_path + ".")}
    norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) or "norm" in type(m).__name__.lower()
             for p in m.parameters(recurse=False)}
    return {n: p for n, p in named.items() if id(p) in norms or n.endswith(".bias")}


def distill_merge_(
    model: nn.Module,
    method: str | TokenPruner,
    data: list[torch.Tensor],
    config: DistillConfig | None = None,
    *,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> nn.Module:
    """Fine-tune `model` in place so that, inside `tokens.prune(model, method)`, its mean-pooled embeddings
    match its own dense ones from before training. `data`: token-id sequences (1-D, specials included),
    e.g. `training_paragraphs(tok)`. A summary is appended to `model.trimformer_history`."""
    cfg = config or DistillConfig()
    if isinstance(method, str):
        method = build(method, settings)
    anatomy = anatomy_of(model)
    if anatomy.causal:
        raise ValueError(f"merge-aware distillation matches mean-pooled embeddings of an encoder; "
                         f"{anatomy.family} is a decoder")
    if len(data) < cfg.batch_size:
        raise ValueError(f"data has {len(data)} sequences, fewer than batch_size={cfg.batch_size}")
    if any(not isinstance(s, torch.Tensor) or s.dim() != 1 or len(s) < 2 for s in data):
        raise ValueError("data must be 1-D token-id tensors of 2+ tokens (one per paragraph)")
    if method.recover is None:  # full length out: mean pooling sees every token
        method = dataclasses.replace(method, recover=len(anatomy.blocks))
    pad = int(getattr(model.config, "pad_token_id", None) or 0)

    was_training = model.training
    model.eval()  # no dropout: the targets are deterministic, so is the student
    by_len = torch.tensor([len(s) for s in data]).argsort(stable=True)
    targets = torch.zeros(len(data), model.config.hidden_size)  # (n, H)
    with torch.no_grad():  # the dense targets, once, from the model as it is now
        for rows in bar(by_len.split(64), desc="dense targets", unit="batch", disable=not progress):
            targets[rows] = pooled(model, *_batch(data, rows, pad)).float()

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    adapters = None
    t0 = time.perf_counter()
    losses: list[float] = []
    stopped = None
    try:
        if cfg.train == "lora":
            adapters = lora_mod.attach(model, anatomy, set(), cfg.lora_rank, 2.0 * cfg.lora_rank)
            params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        else:
            params = _trainable(model, cfg.train, anatomy.blocks_path)
            for n, p in model.named_parameters():
                p.requires_grad_(n in params)
        opt = torch.optim.AdamW(params.values(), lr=cfg.learning_rate, weight_decay=0.0)
        factor = _schedule(cfg.steps, cfg.warmup_steps)
        g = torch.Generator().manual_seed(cfg.seed)
        # Batches of similar length (little padding to compute), in a new random order every epoch.
        groups = list(by_len.split(cfg.batch_size))
        groups = [grp for grp in groups if len(grp) == cfg.batch_size] or groups
        order: list[int] = []
        steps = bar(range(cfg.steps), desc="distill merge", unit="step", disable=not progress)
        with prune(model, method):
            for step in steps:
                used = (time.perf_counter() - t0) / 60 / cfg.max_minutes if cfg.max_minutes else 0.0
                if used >= 1.0:
                    stopped = f"time limit of {cfg.max_minutes:g} min reached after {step} steps"
                    break
                for grp in opt.param_groups:  # schedule at whichever is further along: steps or time
                    grp["lr"] = cfg.learning_rate * factor(max(step, int(used * cfg.steps)))
                if not order:  # a new epoch
                    order = torch.randperm(len(groups), generator=g).tolist()
                rows = groups[order.pop()]
                ids, mask = _batch(data, rows, pad)
                loss, parts = distill_loss(pooled(model, ids, mask), targets[rows], cfg)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"loss became {loss.item()} at step {step + 1} ({parts}); lower lr")
                loss.backward()
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                steps.set_postfix(loss=f"{loss.item():.4f}", **{k: f"{v:.4f}" for k, v in parts.items()})
        if adapters is not None:
            adapters.merge_()
            adapters = None
    finally:
        if adapters is not None:
            adapters.discard_()
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        model.train(was_training)
    history = getattr(model, "trimformer_history", [])
    history.append({"method": "distill-merge", "settings": {**asdict(cfg), "token_method": method.name,
                                                              "token_settings": asdict(method)},
                    "seconds": time.perf_counter() - t0,
                    "result": {"steps_run": len(losses), "stopped": stopped, "losses": losses}})
    model.trimformer_history = history
    return model


def training_paragraphs(tokenizer, exclude: int = 512, lo: int = 16, hi: int = 256,
                        docstrings: bool = False) -> list[torch.Tensor]:
    """Paragraphs for training, none of them among the first `exclude` doc-corpus paragraphs of 32-256
    tokens (the P4 evaluation set, `bench.paragraph_batches`), nor a copy of one (the corpus repeats some):
    each as token ids with specials, `lo` to `hi` tokens (longer ones cut to `hi`). The rest of the doc
    corpus, plus with `docstrings` the paragraphs of this Python's standard-library docstrings."""
    from ..data import doc_corpus

    paragraphs = [p for p in doc_corpus().split("\n\n") if p.strip()]
    held = []
    for p in paragraphs:
        if len(held) < exclude and 32 <= len(tokenizer(p)["input_ids"]) <= 256:
            held.append(p)
    held_set = set(held)
    if docstrings:
        paragraphs += stdlib_docstrings()
    out, seen = [], set(held_set)
    for p in paragraphs:
        if p in seen:
            continue
        seen.add(p)
        ids = tokenizer(p, truncation=True, max_length=hi)["input_ids"]
        if len(ids) >= lo:
            out.append(torch.tensor(ids, dtype=torch.long))
    return out


# Standard-library modules that open windows, print, or take seconds to import.
_SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data", "lib2to3"}


def stdlib_docstrings() -> list[str]:
    """Paragraphs (12+ words) of the docstrings of the standard library's modules and their classes and
    functions, in module order: offline text close to the doc corpus (same subject, other sentences)."""
    import contextlib
    import importlib
    import inspect
    import io
    import pkgutil
    import sys
    import warnings

    names = sorted(m.name for m in pkgutil.iter_modules() if m.name in sys.stdlib_module_names
                   and not m.name.startswith("_") and m.name not in _SKIP)
    out = []
    for name in names:
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:  # (platform-specific modules)
            continue
        objs = [mod] + [v for _, v in inspect.getmembers(mod)
                        if (inspect.isclass(v) or inspect.isfunction(v)) and getattr(v, "__module__", None) == name]
        for o in objs:
            doc = inspect.getdoc(o) or ""
            out += [p for p in doc.split("\n\n") if len(p.split()) >= 12]
    return out
