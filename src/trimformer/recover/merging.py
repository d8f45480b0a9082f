"""Merge-aware distillation: fine-tune an encoder with token merging ON, towards its own dense embeddings.

ToMe (Bolya et al., 2023) reports that fine-tuning with merging active recovers most of what training-free
merging loses. Here the student is the model itself inside `tokens.prune(model, method)` (the merged
forward is differentiable: only the plan, which tokens go where, is made under no_grad); the targets are
the mean-pooled embeddings of the same model before training, without merging, computed once. It trains
on the training loop (recover/loop.py): this module gives it the objective, the batches and what trains.

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
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..config import settings as settings_of
from ..models import anatomy_of
from ..progress import bar
from ..tokens import TokenPruner, build, prune
from . import lora as lora_mod
from .loop import SCHEDULE_ALIASES, NonFiniteLossError, Schedule, TimeLimit, loss_terms, train_

TERMS = ("cos", "mse", "sim", "rank")


@dataclass(init=False)
class DistillConfig(Config):
    """schedule: steps (200), batch_size (16), lr (None: 3e-5 for 'all' / 'blocks', 1e-3 for 'norms' and
    'lora'), warm-up, time limit (recover/loop.py); every schedule setting also has its flat name."""

    aliases: ClassVar[dict[str, str]] = {  # (the identity entries keep the records' order of settings)
        **{k: v for k, v in SCHEDULE_ALIASES.items() if k not in ("max_minutes", "seed")},
        "loss": "loss", "sim_weight": "sim_weight", "rank_weight": "rank_weight", "tau": "tau", "train": "train",
        "lora_rank": "lora_rank", "max_minutes": "schedule.max_minutes", "seed": "schedule.seed",
    }

    schedule: Schedule = field(default_factory=lambda: Schedule(steps=200, batch_size=16))
    loss: str = "cos+sim"
    sim_weight: float = 1.0
    rank_weight: float = 1.0
    tau: float = 0.05
    train: Literal["all", "blocks", "norms", "lora"] = "all"
    lora_rank: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        terms = self.terms  # (checks the spec)
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be a positive integer, got {self.lora_rank!r}")
        if self.schedule.batch_size < 2 and {"sim", "rank"} & set(terms):
            raise ValueError("the 'sim' and 'rank' terms compare paragraphs within a batch: batch_size must be >= 2")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0 (a softmax temperature), got {self.tau}")

    @property
    def terms(self) -> tuple[str, ...]:
        return loss_terms(self.loss, TERMS, "cos+sim")

    @property
    def learning_rate(self) -> float:
        lr = self.schedule.lr
        return lr if lr is not None else (1e-3 if self.train in ("norms", "lora") else 3e-5)


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


class _Batches:
    """Batches of paragraphs of similar length (little padding to compute), in a new random order every
    epoch: `rows(step)` for consecutive steps."""

    def __init__(self, by_len: torch.Tensor, batch_size: int, seed: int):
        groups = list(by_len.split(batch_size))
        self.groups = [grp for grp in groups if len(grp) == batch_size] or groups
        self.g = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def rows(self, step: int) -> torch.Tensor:
        if not self.order:  # a new epoch
            self.order = torch.randperm(len(self.groups), generator=self.g).tolist()
        return self.groups[self.order.pop()]


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
    e.g. `trimformer.data.training_paragraphs(tok)`. A summary is appended to `model.trimformer_history`."""
    cfg = config or DistillConfig()
    S = cfg.schedule
    if isinstance(method, str):
        method = build(method, settings)
    anatomy = anatomy_of(model)
    if anatomy.causal:
        raise ValueError(f"merge-aware distillation matches mean-pooled embeddings of an encoder; "
                         f"{anatomy.family} is a decoder")
    if len(data) < S.batch_size:
        raise ValueError(f"data has {len(data)} sequences, fewer than batch_size={S.batch_size}")
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
    try:
        if cfg.train == "lora":
            adapters = lora_mod.attach(model, anatomy, set(), cfg.lora_rank, 2.0 * cfg.lora_rank)
            params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        else:
            params = _trainable(model, cfg.train, anatomy.blocks_path)
            for n, p in model.named_parameters():
                p.requires_grad_(n in params)
        opt = torch.optim.AdamW(params.values(), lr=cfg.learning_rate, weight_decay=S.weight_decay)
        batches = _Batches(by_len, S.batch_size, S.seed)

        def objective(step: int) -> tuple[torch.Tensor, dict[str, float]]:
            rows = batches.rows(step)
            ids, mask = _batch(data, rows, pad)
            return distill_loss(pooled(model, ids, mask), targets[rows], cfg)

        callbacks = [TimeLimit(S.max_minutes)] if S.max_minutes else []
        with prune(model, method):
            try:
                run = train_(objective, params, opt, S, callbacks, progress=progress, desc="distill merge")
            except NonFiniteLossError as e:
                raise NonFiniteLossError(f"{e}; lower lr") from None
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
    history.append({"method": "distill-merge", "settings": {**settings_of(cfg), "token_method": method.name,
                                                              "token_settings": dataclasses.asdict(method)},
                    "seconds": time.perf_counter() - t0,
                    "result": {"steps_run": run.step, "stopped": run.stopped, "losses": run.losses}})
    model.trimformer_history = history
    return model
