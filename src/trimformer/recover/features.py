"""Feature distillation of a vision encoder from its dense teacher, on the one training loop (loop.py).

The student is a pruned copy of the teacher (a structural cut: NViT recovers its accuracy by distillation
from the dense model), or the model itself inside a token method (`method`: EET's discriminative knowledge
transfer, where the pruned-token student learns the dense teacher's features). The teacher's output features
for the training images are computed once; the student's are compared with them:

    tokens  every output token (after the final norm): MSE divided by the teacher's mean square
    cls     1 - cosine of the [CLS] feature
    mean    1 - cosine of the mean-pooled patch feature
    rank    KL between each image's softmax over the batch's [CLS] cosines at temperature `tau`, teacher ||
            student: the neighbourhoods that retrieval reads (the other images of the batch as a gallery)

A token method must restore full length after its last block (`recover`), so that 'tokens' and 'mean' see every
patch; it is set to the model's depth when unset.
"""

from __future__ import annotations

import contextlib
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
from ..tokens import TokenPruner, prune
from .loop import SCHEDULE_ALIASES, NonFiniteLossError, Schedule, TimeLimit, loss_terms, train_

TERMS = ("tokens", "cls", "mean", "rank")


@dataclass(init=False)
class FeatureDistillConfig(Config):
    """schedule: steps (200), batch_size (16), lr (1e-5 by default), warm-up, time limit (recover/loop.py), each
    also under its flat name. loss: '+'-joined TERMS; rank_weight scales 'rank'. train: the 'blocks' (default),
    'all' parameters, or 'norms' (LayerNorms, layer scales and biases). Adam moves every parameter by about lr per
    step whatever its gradient: on dinov2-s two steps at 1e-4 from the dense model itself (loss ~0) took the [CLS]
    cosine to 0.92, and the [CLS] token and position embeddings (magnitudes ~0.005) suffer most; a cut at 30 %
    fewer parameters got worse at 3e-5 and better at 1e-5 (blocks only) over its first 12 steps."""

    aliases: ClassVar[dict[str, str]] = {**SCHEDULE_ALIASES, "loss": "loss", "rank_weight": "rank_weight", "tau": "tau",
                                         "train": "train"}

    schedule: Schedule = field(default_factory=lambda: Schedule(steps=200, batch_size=16, warmup_steps=5))
    loss: str = "tokens+cls"
    rank_weight: float = 1.0
    tau: float = 0.05
    train: Literal["all", "blocks", "norms"] = "blocks"

    def __post_init__(self) -> None:
        super().__post_init__()
        if "rank" in self.terms and self.schedule.batch_size < 2:
            raise ValueError("the 'rank' term compares images within a batch: batch_size must be >= 2")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0 (a softmax temperature), got {self.tau}")

    @property
    def terms(self) -> tuple[str, ...]:
        return loss_terms(self.loss, TERMS, "tokens+cls")

    @property
    def learning_rate(self) -> float:
        return self.schedule.lr if self.schedule.lr is not None else 1e-5


def feature_loss(s: torch.Tensor, t: torch.Tensor, cfg: FeatureDistillConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """s, t (B, 1+N, H): student and teacher output features of one batch ([CLS] first)."""
    s, t = s.float(), t.float()
    terms, parts = cfg.terms, {}
    if "tokens" in terms:
        parts["tokens"] = F.mse_loss(s, t) / t.pow(2).mean().clamp(min=1e-12)
    if "cls" in terms:
        parts["cls"] = (1.0 - F.cosine_similarity(s[:, 0], t[:, 0], dim=-1)).mean()
    if "mean" in terms:
        parts["mean"] = (1.0 - F.cosine_similarity(s[:, 1:].mean(1), t[:, 1:].mean(1), dim=-1)).mean()
    if "rank" in terms:
        es, et = F.normalize(s[:, 0], dim=-1), F.normalize(t[:, 0], dim=-1)
        off = ~torch.eye(len(s), dtype=torch.bool, device=s.device)  # an image is not its own neighbour
        logit, logit_t = (((e @ e.T) / cfg.tau).masked_fill(~off, -1e4) for e in (es, et))  # (B, B) each
        parts["rank"] = cfg.rank_weight * F.kl_div(logit.log_softmax(-1), logit_t.log_softmax(-1), log_target=True,
                                                   reduction="batchmean")
    return sum(parts.values()), {k: v.item() for k, v in parts.items()}


def _trainable(model: nn.Module, train: str, blocks_path: str) -> dict[str, nn.Parameter]:
    named = dict(model.named_parameters())
    if train == "all":
        return named
    if train == "blocks":
        return {n: p for n, p in named.items() if n.startswith(blocks_path + ".")}
    keep = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) or "norm" in type(m).__name__.lower()
            or "scale" in type(m).__name__.lower() for p in m.parameters(recurse=False)}
    return {n: p for n, p in named.items() if id(p) in keep or n.endswith(".bias")}


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, batch: int = 32, progress: bool = False) -> torch.Tensor:
    """Output features (n, 1+N, H) of `images` (n, 3, h, w), fp32, `batch` at a time."""
    device = next(model.parameters()).device
    out = [model(pixel_values=images[i:i + batch].to(device)).last_hidden_state.float().cpu()
           for i in bar(range(0, len(images), batch), desc="teacher features", unit="batch", disable=not progress)]
    return torch.cat(out)


def distill_features_(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    config: FeatureDistillConfig | None = None,
    *,
    method: TokenPruner | None = None,
    progress: bool = True,
) -> nn.Module:
    """Fine-tune `student` in place so that its output features on `images` (n, 3, h, w) match `teacher`'s
    (inside `tokens.prune(student, method)` when a token method is given). The teacher is not changed; it may
    be the student itself when `method` is given (its dense features are computed before training). A summary
    is appended to `student.trimformer_history`."""
    cfg = config or FeatureDistillConfig()
    S = cfg.schedule
    if not (isinstance(images, torch.Tensor) and images.is_floating_point() and images.dim() == 4):
        raise ValueError(f"images must be pixel values (n, 3, H, W), got {getattr(images, 'shape', type(images))}")
    if len(images) < S.batch_size:
        raise ValueError(f"{len(images)} images, fewer than batch_size={S.batch_size}")
    anatomy = anatomy_of(student)
    if anatomy.family not in ("vit", "dinov2"):
        raise ValueError(f"feature distillation reads image features; {anatomy.family} is not a vision encoder")
    if student is teacher and method is None:
        raise ValueError("the teacher is the student itself: give a token method (else there is nothing to learn)")
    if method is not None and method.recover is None:  # full length out: every patch has a feature
        method = dataclasses.replace(method, recover=len(anatomy.blocks))

    was_training, teacher_training = student.training, teacher.training
    student.eval()  # no dropout: deterministic targets and student
    teacher.eval()
    targets = features(teacher, images, progress=progress)  # (n, 1+N, H), before any training
    if targets.shape[-1] != anatomy.hidden_size:  # hidden channels were cut: the teacher's on the channels left
        kept = getattr(student, "trimformer_channels", None)
        if kept is None or len(kept) != anatomy.hidden_size:
            raise ValueError(f"the student has {anatomy.hidden_size} hidden channels, the teacher {targets.shape[-1]}, "
                             "and the student does not record which it kept (structure.channels.prune_channels does)")
        targets = targets[..., kept]
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    t0 = time.perf_counter()
    try:
        params = _trainable(student, cfg.train, anatomy.blocks_path)
        for n, p in student.named_parameters():
            p.requires_grad_(n in params)
        opt = torch.optim.AdamW(params.values(), lr=cfg.learning_rate, weight_decay=S.weight_decay)
        g = torch.Generator().manual_seed(S.seed)
        order: list[int] = []
        device = next(student.parameters()).device

        def objective(step: int) -> tuple[torch.Tensor, dict[str, float]]:
            nonlocal order
            if len(order) < S.batch_size:  # a new epoch, in a new random order
                order = torch.randperm(len(images), generator=g).tolist()
            rows, order = order[:S.batch_size], order[S.batch_size:]
            out = student(pixel_values=images[rows].to(device)).last_hidden_state  # (B, 1+N, H)
            return feature_loss(out, targets[rows].to(device), cfg)

        callbacks = [TimeLimit(S.max_minutes)] if S.max_minutes else []
        with prune(student, method) if method is not None else contextlib.nullcontext():
            try:
                run = train_(objective, params, opt, S, callbacks, progress=progress, desc="distill features")
            except NonFiniteLossError as e:
                raise NonFiniteLossError(f"{e}; lower lr") from None
    finally:
        for n, p in student.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        student.train(was_training)
        teacher.train(teacher_training)
    history = getattr(student, "trimformer_history", [])
    record: dict[str, Any] = {"method": "distill-features", "settings": settings_of(cfg)}
    if method is not None:
        record["settings"].update(token_method=method.name, token_settings=dataclasses.asdict(method))
    history.append({**record, "seconds": time.perf_counter() - t0,
                    "result": {"steps_run": run.step, "stopped": run.stopped, "losses": run.losses,
                               "images": len(images)}})
    student.trimformer_history = history
    return student

