"""`RecoverConfig`: the settings of recovery, one small config per concern.

The flat names (CLI flags, `--set`, recipe steps, Python keywords) map onto the groups in `ALIASES`, the
one table of them; the nested form (`{lora: {rank: 8}}`, `lora.rank=8`, `lora=LoRAConfig(rank=8)`) is
accepted alike, and records (history, checkpoints, recipes written back) use the flat names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ..config import Config, settings
from .loop import Schedule
from .loss import parse_loss


@dataclass
class Objective(Config):
    """loss: '+'-joined terms: 'kl' (logits at `temperature`), 'hidden' (block outputs, weighted by
    `hidden_weight`; student block i against teacher block hidden_map[i], default evenly spread), 'lm'
    (next-token cross-entropy, weighted by `lm_weight`). chunk: KL / LM loss computed from the last hidden
    states this many tokens at a time, gradient included, so neither model's (B, T, vocab) logits exist
    whole; 0 computes them whole (the reference)."""

    loss: str = "kl"
    temperature: float = 1.0
    hidden_weight: float = 1.0
    lm_weight: float = 1.0
    hidden_map: list[int] | None = None
    chunk: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_loss(self.loss)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.chunk < 0:
            raise ValueError(f"loss_chunk must be a token count >= 0 (0: whole logits), got {self.chunk!r}")

    @property
    def terms(self) -> tuple[str, ...]:
        return parse_loss(self.loss)


@dataclass
class LoRAConfig(Config):
    """rank: None trains the parameters themselves; r > 0 trains rank-r LoRA adapters (peft) on the block
    projections, merged back at the end (alpha defaults to 2r)."""

    rank: int | None = None
    alpha: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"lora_rank must be a positive integer or None (full fine-tuning), got {self.rank!r}")


@dataclass
class Memory(Config):
    """gradient_checkpointing: recompute block activations in backward (less memory, ~30 % more compute).
    release: make freed tensors go back to the OS at once (recover/memory.py; ~20 % slower). None, for
    both: on with LoRA (where activations are most of what is left), off for full fine-tuning."""

    gradient_checkpointing: bool | None = None
    release: bool | None = None


@dataclass
class GMP(Config):
    """Gradual magnitude pruning to `sparsity` per block projection during training, cubic schedule (Zhu &
    Gupta, 2017) from step start*steps to end*steps, every `every` steps. None: off."""

    sparsity: float | None = None
    start: float = 0.0
    end: float = 0.7
    every: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.every < 1:
            raise ValueError(f"gmp_every must be a positive integer, got {self.every!r}")
        if self.sparsity is not None:
            if not 0.0 < self.sparsity < 1.0:
                raise ValueError(f"gmp_sparsity must be in (0, 1), got {self.sparsity}")
            if not 0.0 <= self.start < self.end <= 1.0:
                raise ValueError(f"need 0 <= gmp_start < gmp_end <= 1 (fractions of steps), got {self.start}, {self.end}")


@dataclass
class Lasso(Config):
    """Sparse then prune: a group lasso of `strength` lambda on the groups a width cut removes (FFN neurons,
    query heads: `parts`), applied as a proximal step after each optimizer step so weak groups reach
    exactly zero before a structured cut (recover/regularize.py). 0: off."""

    strength: float = 0.0
    parts: list[Literal["ffn", "heads"]] = field(default_factory=lambda: ["ffn", "heads"])

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.strength >= 0.0:
            raise ValueError(f"group_lasso must be >= 0 (0: off), got {self.strength}")
        if not self.parts:
            raise ValueError("group_lasso_parts is empty: use 'ffn', 'heads' or 'ffn,heads'")


@dataclass
class Freezing(Config):
    """SlimFit-style freezing: after at*steps steps, freeze this `fraction` of the blocks whose weights
    moved least so far (recover/freeze.py). 0: off."""

    fraction: float = 0.0
    at: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.fraction < 1.0 or not 0.0 < self.at < 1.0:
            raise ValueError(f"need 0 <= freeze_fraction < 1 and 0 < freeze_at < 1, got {self.fraction}, {self.at}")


@dataclass
class Checkpointing(Config):
    """Write a checkpoint to `dir` every `every` steps, keeping the newest `keep`; with `resume`, a run
    finding one there continues from it (and repeats the same next step)."""

    dir: str | None = None
    every: int = 50
    keep: int = 2
    resume: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, value in (("checkpoint_every", self.every), ("keep_checkpoints", self.keep)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


# Every setting's flat name -> where it lives; also the order in which records list them.
ALIASES = {
    "steps": "schedule.steps", "batch_size": "schedule.batch_size", "lr": "schedule.lr",
    "warmup_steps": "schedule.warmup_steps", "weight_decay": "schedule.weight_decay",
    "max_grad_norm": "schedule.max_grad_norm",
    "loss": "objective.loss", "temperature": "objective.temperature", "hidden_weight": "objective.hidden_weight",
    "lm_weight": "objective.lm_weight", "hidden_map": "objective.hidden_map",
    "train": "train",
    "lora_rank": "lora.rank", "lora_alpha": "lora.alpha",
    "gradient_checkpointing": "memory.gradient_checkpointing",
    "loss_chunk": "objective.chunk",
    "release_memory": "memory.release",
    "gmp_sparsity": "gmp.sparsity", "gmp_start": "gmp.start", "gmp_end": "gmp.end", "gmp_every": "gmp.every",
    "group_lasso": "lasso.strength", "group_lasso_parts": "lasso.parts",
    "freeze_fraction": "freeze.fraction", "freeze_at": "freeze.at",
    "teacher_cache": "teacher_cache",
    "max_minutes": "schedule.max_minutes",
    "checkpoint_dir": "checkpoint.dir", "checkpoint_every": "checkpoint.every", "keep_checkpoints": "checkpoint.keep",
    "resume": "checkpoint.resume",
    "seed": "schedule.seed",
}

# Settings that may differ between an interrupted run and its resumption.
RESUME_FREE = {"release_memory", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume", "teacher_cache",
               "max_minutes"}


@dataclass(init=False)
class RecoverConfig(Config):
    """Distillation fine-tuning of a pruned student from its dense teacher, keeping masks and shapes.

    schedule: steps, batch size, learning rate (None: 1e-4 for full fine-tuning, 1e-3 for LoRA), time limit.
    objective: the loss. train: 'blocks' (the transformer blocks' parameters) or 'all' (every parameter
    that requires grad); parameters frozen on entry stay frozen. lora, memory, gmp, lasso, freeze,
    checkpoint: see each class. teacher_cache: a .safetensors file of the teacher's targets for every
    window of the data (its last hidden states, from which the loss recomputes the logits exactly; see
    recover/cache.py), computed once if absent and reused by every epoch and later run; the teacher's
    blocks then never run during training.

    Every setting also has a flat name (`RecoverConfig(steps=300, lora_rank=16)`): `ALIASES`.
    """

    aliases: ClassVar[dict[str, str]] = ALIASES

    schedule: Schedule = field(default_factory=Schedule)
    objective: Objective = field(default_factory=Objective)
    train: Literal["blocks", "all"] = "blocks"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    memory: Memory = field(default_factory=Memory)
    gmp: GMP = field(default_factory=GMP)
    lasso: Lasso = field(default_factory=Lasso)
    freeze: Freezing = field(default_factory=Freezing)
    teacher_cache: str | None = None
    checkpoint: Checkpointing = field(default_factory=Checkpointing)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.teacher_cache is not None and not self.teacher_cache.endswith(".safetensors"):
            raise ValueError(f"teacher_cache must be a .safetensors file path, got {self.teacher_cache!r}")
        lora = self.lora.rank is not None
        if self.gmp.sparsity is not None and lora:
            raise ValueError("gradual magnitude pruning prunes the weights themselves; it cannot run with LoRA "
                             "(use lora_rank=None)")
        if self.lasso.strength and (lora or self.freeze.fraction):
            raise ValueError("group_lasso shrinks the weights themselves; it needs full fine-tuning without "
                             "freezing (lora_rank=None, freeze_fraction=0)")
        if self.freeze.fraction and lora:
            raise ValueError("freeze_fraction applies to full fine-tuning; LoRA already trains few parameters")

    @property
    def checkpointing(self) -> bool:
        """Gradient checkpointing on? (the setting, or its default)"""
        on = self.memory.gradient_checkpointing
        return bool(self.lora.rank) if on is None else on

    @property
    def releasing_memory(self) -> bool:
        on = self.memory.release
        return bool(self.lora.rank) if on is None else on

    @property
    def learning_rate(self) -> float:
        lr = self.schedule.lr
        return lr if lr is not None else (1e-3 if self.lora.rank else 1e-4)

    def settings(self) -> dict:
        """Every setting under its flat name (what the CLI, recipes and records use)."""
        return settings(self)
