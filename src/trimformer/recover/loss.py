"""The distillation loss: KL on logits (with temperature), block hidden states, and the LM loss.

KL(teacher || student) at temperature T, scaled by T^2 so its gradients keep their size (Hinton et al.,
2015). Hidden matching compares each student block's output with a teacher block's output (MSE divided
by the teacher's mean square, so every block weighs alike); after depth cuts the student has fewer
blocks and `block_map` says which teacher block each one stands for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..models import Anatomy
from .headloss import fusable, head_loss

TERMS = ("kl", "hidden", "lm")


def parse_loss(spec: str) -> tuple[str, ...]:
    terms = tuple(t.strip() for t in spec.split("+") if t.strip())
    bad = [t for t in terms if t not in TERMS]
    if not terms or bad:
        raise ValueError(f"loss {spec!r}: use '+'-joined terms from {', '.join(TERMS)} (e.g. 'kl+hidden'), got {bad or spec!r}")
    return terms


def block_map(n_student: int, n_teacher: int, given: list[int] | None = None) -> list[int]:
    """Teacher block index for each student block. Default: evenly spread, last block to last block."""
    if given is not None:
        if len(given) != n_student or any(not 0 <= j < n_teacher for j in given):
            raise ValueError(
                f"hidden_map must list one teacher block (0..{n_teacher - 1}) per student block "
                f"({n_student} entries), got {given}"
            )
        return list(given)
    return [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]


@contextlib.contextmanager
def capture_blocks(modules: list[nn.Module], into: dict[int, torch.Tensor]) -> Iterator[None]:
    """Forward hooks storing each block's output hidden states (B, T, H) in `into[i]`; removed on exit."""

    def hook(i: int):
        def fn(module, args, out):
            into[i] = out[0] if isinstance(out, tuple) else out

        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of softened next-token distributions, times T^2."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, T, V)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean() * temperature**2


def hidden_loss(student: dict[int, torch.Tensor], teacher: dict[int, torch.Tensor], mapping: list[int]) -> torch.Tensor:
    losses = []
    for i, j in enumerate(mapping):
        hs = student[i].float()  # (B, T, H)
        ht = teacher[j].to(hs.device).float()
        losses.append(F.mse_loss(hs, ht) / ht.pow(2).mean().clamp(min=1e-12))
    return torch.stack(losses).mean()


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1))  # predict token t+1


class Distiller:
    """Computes the configured loss for one batch; the teacher runs on the fly under no_grad."""

    def __init__(self, student: Anatomy, teacher: Anatomy, terms: tuple[str, ...], temperature: float = 1.0,
                 hidden_weight: float = 1.0, lm_weight: float = 1.0, hidden_map: list[int] | None = None,
                 chunk: int | None = 128):
        self.terms, self.T = terms, temperature
        self.hidden_weight, self.lm_weight = hidden_weight, lm_weight
        if ("kl" in terms or "lm" in terms) and (student.head is None or teacher.head is None):
            raise ValueError(
                f"loss {'+'.join(terms)!r} needs next-token logits, but the {'student' if student.head is None else 'teacher'} "
                "has no LM head (an encoder?); use loss='hidden'"
            )
        if "lm" in terms and not student.causal:
            raise ValueError("the 'lm' loss term needs a causal (decoder) model; use loss='kl' or 'hidden'")
        self.mapping: list[int] = []
        if "hidden" in terms:
            if student.hidden_size != teacher.hidden_size:
                raise ValueError(
                    f"hidden matching needs equal hidden sizes (student {student.hidden_size}, teacher "
                    f"{teacher.hidden_size}); use loss='kl' or 'kl+lm' after a hidden-channel cut"
                )
            self.mapping = block_map(len(student.blocks), len(teacher.blocks), hidden_map)
        self.student_blocks = [b.module for b in student.blocks]
        self.teacher_blocks = [b.module for b in teacher.blocks]
        self.s_kw = {"use_cache": False} if student.causal else {}  # (decoders: no KV cache while training)
        self.t_kw = {"use_cache": False} if teacher.causal else {}
        logits = "kl" in terms or "lm" in terms
        # fused: both heads are swapped for identities during the forward passes and the head loss runs chunked
        self.fused = bool(chunk) and logits and fusable(student.head) and fusable(teacher.head)
        self.chunk = chunk or 0
        self.s_head, self.t_head = student.head, teacher.head
        self.s_model, self.t_model = student.model, teacher.model

    def teacher_targets(self, teacher: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the loss needs from the teacher for `ids` (B, T): 'out' (its last hidden states when fused,
        else logits) and 'block.j' (outputs of the teacher blocks the hidden term maps to)."""
        ht: dict[int, torch.Tensor] = {}
        t_device = next(teacher.parameters()).device
        with torch.no_grad(), (capture_blocks(self.teacher_blocks, ht) if self.mapping else contextlib.nullcontext()), \
                (head_off(self.t_model, self.t_head) if self.fused else contextlib.nullcontext()):
            out = {"out": teacher(input_ids=ids.to(t_device), **self.t_kw).logits} if self.logits else {}
            if not self.logits:
                teacher(input_ids=ids.to(t_device), **self.t_kw)
        out.update({f"block.{j}": ht[j] for j in sorted(set(self.mapping))})
        return out

    @property
    def logits(self) -> bool:
        return "kl" in self.terms or "lm" in self.terms

    def __call__(self, student: nn.Module, teacher: nn.Module | None, ids: torch.Tensor,
                 targets: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss for `ids` (B, T); `targets`: the teacher's, from a cache (else the teacher runs now)."""
        t = targets if targets is not None else self.teacher_targets(teacher, ids)
        hs: dict[int, torch.Tensor] = {}
        hidden = "hidden" in self.terms
        with (capture_blocks(self.student_blocks, hs) if hidden else contextlib.nullcontext()), \
                (head_off(self.s_model, self.s_head) if self.fused else contextlib.nullcontext()):
            s_out = student(input_ids=ids, **self.s_kw).logits  # (B, T, H) when fused, else (B, T, V)
        parts: dict[str, torch.Tensor] = {}
        if self.fused:
            kl_w = 1.0 if "kl" in self.terms else 0.0
            lm_w = self.lm_weight if "lm" in self.terms else 0.0
            head, terms = head_loss(s_out, self.s_head, t.get("out") if kl_w else None, self.t_head, ids, self.T,
                                    kl_w, lm_w, self.chunk)
            parts["head"] = head
            shown = {k: v for k, v in terms.items() if k in self.terms}
        else:
            if "kl" in self.terms:
                parts["kl"] = kl_loss(s_out, t["out"].to(s_out.device), self.T)
            if "lm" in self.terms:
                parts["lm"] = self.lm_weight * lm_loss(s_out, ids)
            shown = {}
        if hidden:
            ht = {j: t[f"block.{j}"] for j in set(self.mapping)}
            parts["hidden"] = self.hidden_weight * hidden_loss(hs, ht, self.mapping)
        loss = sum(parts.values())
        report = {k: v.item() for k, v in parts.items() if k != "head"}
        report.update({k: v.item() * (self.lm_weight if k == "lm" else 1.0) for k, v in shown.items()})
        return loss, report


@contextlib.contextmanager
def head_off(model: nn.Module, head: nn.Module) -> Iterator[None]:
    """Swap `head` for an identity inside `model`: its forward then returns the last hidden states as logits."""
    for name, m in model.named_modules():
        if m is head:
            parent, _, attr = name.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            break
    else:
        raise ValueError("the LM head is not a submodule of its model")
    setattr(owner, attr, nn.Identity())
    try:
        yield
    finally:
        setattr(owner, attr, head)
