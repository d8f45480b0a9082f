"""`recover_(student, teacher, data, RecoverConfig(...))`: distillation fine-tuning that keeps the cuts.

The loop: teacher logits on the fly, loss (KL / hidden / LM), AdamW step, re-mask. Checkpoints hold
everything the next step depends on (trained tensors, optimizer, LR schedule, RNG, masks, step; the
batch order is a function of the seed and the step), so a resumed run repeats the same next step.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..models import anatomy_of
from ..progress import bar
from . import cache as cache_mod
from . import checkpoint as ckpt
from . import lora as lora_mod
from .freeze import Freezer
from .loss import Distiller, parse_loss
from .masks import MaskKeeper, gmp_targets
from .regularize import GroupLasso, parse_parts

# Fields that may differ between an interrupted run and its resumption.
_RESUME_FREE = {"release_memory", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume", "teacher_cache", "max_minutes"}


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class RecoverConfig:
    """Distillation fine-tuning of a pruned student from its dense teacher, keeping masks and shapes.

    loss: '+'-joined terms: 'kl' (logits at `temperature`), 'hidden' (block outputs; student block i
      against teacher block hidden_map[i], default evenly spread), 'lm' (next-token cross-entropy).
    train: 'blocks' (the transformer blocks' parameters) or 'all' (every parameter that requires grad).
      Parameters frozen on entry stay frozen.
    lr: None picks 1e-4 for full fine-tuning, 1e-3 for LoRA. Warm-up, then cosine decay to lr/10.
    lora_rank: None trains the parameters themselves; r > 0 trains rank-r LoRA adapters (peft) on the
      block projections, merged back at the end (alpha defaults to 2r).
    gradient_checkpointing: recompute block activations in backward (less memory, ~30 % more compute);
      None: on with LoRA (where activations are most of what is left), off for full fine-tuning.
    loss_chunk: KL / LM loss computed from the last hidden states this many tokens at a time, gradient
      included, so neither model's (B, T, vocab) logits exist whole; 0 computes them whole (the reference).
    gmp_sparsity: gradual magnitude pruning to this sparsity per block projection during training, cubic
      schedule (Zhu & Gupta, 2017) from step gmp_start*steps to gmp_end*steps, every gmp_every steps.
    group_lasso: sparse then prune: strength lambda of a group lasso on the groups a width cut removes
      (FFN neurons, query heads; `group_lasso_parts`), applied as a proximal step after each optimizer step
      so weak groups reach exactly zero before a structured cut (recover/regularize.py). Full fine-tuning only.
    freeze_fraction: SlimFit-style freezing: after freeze_at*steps steps, freeze this share of the blocks
      whose weights moved least so far (full fine-tuning only).
    release_memory: make freed tensors go back to the OS at once (glibc: a fixed 128 KiB mmap threshold,
      process-wide from then on). glibc's default threshold grows to 32 MiB, after which freed activations
      stay in the heap: on smollm2-135m with LoRA that kept ~390 MiB of RSS that no tensor used. It costs
      ~20 % of the training speed there (fresh pages for every large tensor). None: on with LoRA only.
    teacher_cache: a .safetensors file of the teacher's targets for every window of `data` (its last hidden
      states, from which the loss recomputes the logits exactly; see recover/cache.py), computed once if
      absent and reused by every epoch and later run; the teacher's blocks then never run during training.
    max_minutes: stop after the step that reaches this much training time; the LR schedule then follows
      whichever is further along, steps or time, so it still ends decayed.
    checkpoint_dir: write a checkpoint every `checkpoint_every` steps (keep the newest `keep_checkpoints`);
      with `resume`, a run finding one there continues from it.
    """

    steps: int = 300
    batch_size: int = 4
    lr: float | None = None
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loss: str = "kl"
    temperature: float = 1.0
    hidden_weight: float = 1.0
    lm_weight: float = 1.0
    hidden_map: list[int] | None = None
    train: str = "blocks"
    lora_rank: int | None = None
    lora_alpha: float | None = None
    gradient_checkpointing: bool | None = None
    loss_chunk: int = 32
    release_memory: bool | None = None
    gmp_sparsity: float | None = None
    gmp_start: float = 0.0
    gmp_end: float = 0.7
    gmp_every: int = 10
    group_lasso: float = 0.0
    group_lasso_parts: str = "ffn,heads"
    freeze_fraction: float = 0.0
    freeze_at: float = 0.1
    teacher_cache: str | None = None
    max_minutes: float | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints", "gmp_every"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"{f} must be a positive integer, got {getattr(self, f)!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0 (or None for the default), got {self.lr}")
        if not isinstance(self.loss_chunk, int) or self.loss_chunk < 0:
            raise ValueError(f"loss_chunk must be a token count >= 0 (0: whole logits), got {self.loss_chunk!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0 (or None: no time limit), got {self.max_minutes}")
        if self.teacher_cache is not None and not str(self.teacher_cache).endswith(".safetensors"):
            raise ValueError(f"teacher_cache must be a .safetensors file path, got {self.teacher_cache!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self.terms = parse_loss(self.loss)
        if self.train not in ("blocks", "all"):
            raise ValueError(f"train must be 'blocks' or 'all', got {self.train!r}")
        if self.lora_rank is not None and (not isinstance(self.lora_rank, int) or self.lora_rank < 1):
            raise ValueError(f"lora_rank must be a positive integer or None (full fine-tuning), got {self.lora_rank!r}")
        if self.gmp_sparsity is not None:
            if not 0.0 < self.gmp_sparsity < 1.0:
                raise ValueError(f"gmp_sparsity must be in (0, 1), got {self.gmp_sparsity}")
            if not 0.0 <= self.gmp_start < self.gmp_end <= 1.0:
                raise ValueError(f"need 0 <= gmp_start < gmp_end <= 1 (fractions of steps), got {self.gmp_start}, {self.gmp_end}")
            if self.lora_rank is not None:
                raise ValueError("gradual magnitude pruning prunes the weights themselves; it cannot run with LoRA "
                                 "(use lora_rank=None)")

        if not self.group_lasso >= 0.0:
            raise ValueError(f"group_lasso must be >= 0 (0: off), got {self.group_lasso}")
        parse_parts(self.group_lasso_parts)
        if self.group_lasso and (self.lora_rank is not None or self.freeze_fraction):
            raise ValueError("group_lasso shrinks the weights themselves; it needs full fine-tuning without "
                             "freezing (lora_rank=None, freeze_fraction=0)")
        if not 0.0 <= self.freeze_fraction < 1.0 or not 0.0 < self.freeze_at < 1.0:
            raise ValueError(f"need 0 <= freeze_fraction < 1 and 0 < freeze_at < 1, got {self.freeze_fraction}, {self.freeze_at}")
        if self.freeze_fraction and self.lora_rank is not None:
            raise ValueError("freeze_fraction applies to full fine-tuning; LoRA already trains few parameters")

    @property
    def checkpointing(self) -> bool:
        return bool(self.lora_rank) if self.gradient_checkpointing is None else self.gradient_checkpointing

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.lora_rank else 1e-4)

    def settings(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "terms"}


def recover_(
    student: nn.Module,
    teacher: nn.Module,
    data: torch.Tensor,
    config: RecoverConfig | None = None,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> nn.Module:
    """Fine-tune `student` in place to match `teacher` on token windows `data` (n, T); returns the student.

    `masks`: parameter name -> bool keep-mask, added to the masks found from zeros in the trained weights.
    A summary (losses, tokens/s, seconds) is appended to `student.trimformer_history`.
    """
    cfg = config or RecoverConfig()
    data = _check_windows(data, student)
    s_anat, t_anat = anatomy_of(student), anatomy_of(teacher)
    if "kl" in cfg.terms and s_anat.vocab_size != t_anat.vocab_size:
        raise ValueError(f"student and teacher vocabularies differ ({s_anat.vocab_size} vs {t_anat.vocab_size}); "
                         "KL distillation needs the same tokenizer")
    distill = Distiller(s_anat, t_anat, cfg.terms, cfg.temperature, cfg.hidden_weight, cfg.lm_weight, cfg.hidden_map,
                         cfg.loss_chunk)

    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    prefix = s_anat.blocks_path + "."
    candidates = {n: p for n, p in student.named_parameters()
                  if p.requires_grad and (cfg.train == "all" or n.startswith(prefix))}
    if not candidates:
        raise ValueError(f"nothing to train: every parameter {'in the blocks ' if cfg.train == 'blocks' else ''}is frozen")
    keeper = MaskKeeper(student, candidates, masks, store_found=not cfg.lora_rank)
    masked = list(keeper.zero_names)
    freezer = Freezer({b.index: {n: p for n, p in candidates.items() if n.startswith(f"{prefix}{b.index}.")}
                       for b in s_anat.blocks}, cfg.freeze_fraction, max(int(cfg.freeze_at * cfg.steps), 1))
    gmp_names = [p.name + ".weight" for _, p in s_anat.projections() if p.name + ".weight" in candidates]

    if cfg.release_memory or (cfg.release_memory is None and cfg.lora_rank):
        release_freed_memory()
    torch.manual_seed(cfg.seed)
    was_training, had_gc = student.training, _checkpointing(student, "is")
    teacher_training = teacher.training
    teacher.eval()  # no dropout in the targets
    adapters: lora_mod.LoRA | None = None
    t0 = time.perf_counter()
    try:
        if cfg.lora_rank:
            keeper.apply_()  # given masks reach the frozen base weights; from here on their zeros are the masks
            adapters = lora_mod.attach(student, s_anat, set(keeper.zero_names), cfg.lora_rank, cfg.lora_alpha or 2.0 * cfg.lora_rank)
            keeper.masks = {}  # (no copy kept: the frozen weights hold them)
            params = {n: p for n, p in student.named_parameters() if p.requires_grad}
        else:
            for n, p in student.named_parameters():
                p.requires_grad_(n in candidates)
            params = candidates
            keeper.attach()
        lasso = (GroupLasso(s_anat, parse_parts(cfg.group_lasso_parts), cfg.group_lasso)
                 if cfg.group_lasso else None)
        if cfg.checkpointing:
            _checkpointing(student, "enable")
        student.train()
        opt = torch.optim.AdamW(params.values(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg.steps, cfg.warmup_steps))
        model, rank, world, acc = _distributed(student, opt, teacher)
        device = next(student.parameters()).device

        start, losses = 0, []
        found = ckpt.latest(cfg.checkpoint_dir) if cfg.checkpoint_dir and cfg.resume else None
        if found is not None:
            start, losses = _restore(found, cfg, params, opt, sched, keeper, freezer)

        cache = None
        if cfg.teacher_cache:
            if rank == 0:  # (computed by one process; the others then open it)
                cache = cache_mod.build(cfg.teacher_cache, distill, teacher, data, batch_size=cfg.batch_size,
                                        progress=progress)
            if acc:
                acc.wait_for_everyone()
            if rank != 0:
                cache = cache_mod.build(cfg.teacher_cache, distill, teacher, data, progress=False)

        B, T = cfg.batch_size, data.shape[1]
        lr_factor = _schedule(cfg.steps, cfg.warmup_steps)
        steps = bar(range(start, cfg.steps), desc="recover", unit="step", total=cfg.steps - start,
                    disable=not progress or rank != 0)
        t_loop, tokens, stopped = time.perf_counter(), 0, None
        last_ckpt = found
        for step in steps:
            if cfg.gmp_sparsity is not None:
                target = gmp_targets(keeper, gmp_names, step, cfg.gmp_sparsity, int(cfg.gmp_start * cfg.steps),
                                     int(cfg.gmp_end * cfg.steps), cfg.gmp_every)
                if target is not None:
                    keeper.magnitude_step_(gmp_names, target)
            if cfg.max_minutes:
                used = (time.perf_counter() - t_loop) / (60 * cfg.max_minutes)
                if used >= 1.0:
                    stopped = f"time limit of {cfg.max_minutes:g} min reached after {step - start} steps"
                    break
                for g in opt.param_groups:  # the schedule at whichever is further along: steps or time
                    g["lr"] = cfg.learning_rate * lr_factor(max(step, int(used * cfg.steps)))
            rows = _rows(data.shape[0], step, B, cfg.seed, rank, world)
            ids = data[rows].to(device)  # (B, T)
            loss, parts = distill(model, teacher, ids, cache.get(rows) if cache else None)
            if not math.isfinite(loss.item()):
                where = (f"the last good checkpoint is {last_ckpt}; resume from it after lowering lr"
                         if last_ckpt else "no checkpoint was written yet (set checkpoint_dir to keep one)")
                raise NonFiniteLossError(
                    f"loss became {loss.item()} at step {step + 1} ({', '.join(f'{k}={v:.4g}' for k, v in parts.items())}); "
                    f"training stopped before updating the weights: {where}"
                )
            (acc.backward(loss) if acc else loss.backward())
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if adapters is None:  # (with LoRA the masked weights are frozen; the hook masks the update)
                keeper.apply_()
            if lasso is not None:
                lasso.shrink_(opt.param_groups[0]["lr"])
            freezer.track(opt, step + 1)
            freezer.maybe_freeze(step + 1)
            losses.append(loss.item())
            tokens += B * T * world
            tok_s = tokens / max(time.perf_counter() - t_loop, 1e-9)
            steps.set_postfix(loss=f"{loss.item():.4f}", tok_s=f"{tok_s:.0f}")
            if cfg.checkpoint_dir and (step + 1) % cfg.checkpoint_every == 0:
                if rank == 0:
                    state = _state(step + 1, cfg, params, opt, sched, keeper, freezer, losses)
                    last_ckpt = ckpt.save(cfg.checkpoint_dir, step + 1, state, cfg.keep_checkpoints)
                if acc:
                    acc.wait_for_everyone()
        seconds = time.perf_counter() - t_loop
        if adapters is not None:
            adapters.merge_()
            adapters = None
    finally:
        if adapters is not None:  # an error: drop the adapters, leave the model as the last completed step
            adapters.discard_()
        keeper.detach()
        for n, p in student.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        if cfg.checkpointing and not had_gc:
            _checkpointing(student, "disable")
        student.train(was_training)
        teacher.train(teacher_training)
    ran = len(losses) - start
    history = getattr(student, "trimformer_history", [])
    result = {
        "steps_run": ran, "resumed_from": start, "stopped": stopped, "losses": losses, "train_seconds": seconds,
        "tokens_per_s": (ran * B * T * world) / max(seconds, 1e-9), "frozen_blocks": freezer.frozen,
        "group_lasso": lasso.summary() if lasso is not None else None,
        "sparsity": {n: _zeros(student.get_parameter(n)) for n in sorted({*masked, *keeper.masks})},  # measured
    }
    history.append({"method": "recover", "settings": cfg.settings(), "seconds": time.perf_counter() - t0, "result": result})
    student.trimformer_history = history
    return student


def release_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 128 KiB so large freed blocks are unmapped at once; False if not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(-3, 128 * 1024))  # M_MMAP_THRESHOLD; also stops its dynamic growth
        libc.malloc_trim(0)  # and give back what the heap already holds free
        return ok
    except (OSError, AttributeError):
        return False


def _zeros(p: torch.Tensor) -> float:
    return 1.0 - p.count_nonzero().item() / p.numel()


def _check_windows(data: torch.Tensor, model: nn.Module) -> torch.Tensor:
    if not isinstance(data, torch.Tensor) or data.dim() != 2 or data.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError("data must be token windows: an integer tensor (n, length), e.g. "
                         "trimformer.data.calibration_windows(tok, n=256, length=256)")
    if data.shape[1] < 2 or data.shape[0] < 1:
        raise ValueError(f"data needs at least 1 window of 2+ tokens, got shape {tuple(data.shape)}")
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and int(data.max()) >= vocab:
        raise ValueError(f"data holds token id {int(data.max())} but the model's vocabulary has {vocab}: wrong tokenizer?")
    return data.long()


def _checkpointing(model: nn.Module, verb: str):
    """Activation (gradient) checkpointing: transformers >= 5 names, then the older ones."""
    if verb == "is":
        name = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else "is_gradient_checkpointing"
        return bool(getattr(model, name, False))
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        return (model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw) if verb == "enable"
                else model.activation_checkpointing_disable())
    if hasattr(model, "gradient_checkpointing_enable"):
        return (model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw) if verb == "enable"
                else model.gradient_checkpointing_disable())
    raise ValueError("this model has no gradient checkpointing; use gradient_checkpointing=False")


def _schedule(steps: int, warmup: int):
    def lr_factor(step: int) -> float:  # linear warm-up, then cosine from 1 to 0.1
        if step < warmup:
            return (step + 1) / (warmup + 1)
        frac = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(frac, 1.0)))

    return lr_factor


_PERMS: dict[tuple[int, int, int], torch.Tensor] = {}


def _batch(data: torch.Tensor, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    return data[_rows(data.shape[0], step, batch_size, seed, rank, world)]  # (B, T)


def _rows(n: int, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Window indices of `step`: a function of (seed, step) only, reshuffled every epoch, so resuming needs no data state."""
    rows = []
    for j in range(batch_size):
        g = (step * world + rank) * batch_size + j  # global sample position
        epoch, pos = divmod(g, n)
        key = (seed, epoch, n)
        if key not in _PERMS:
            if len(_PERMS) > 64:
                _PERMS.clear()
            _PERMS[key] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        rows.append(_PERMS[key][pos])
    return torch.stack(rows)  # (B,)


def _distributed(model: nn.Module, opt: torch.optim.Optimizer, teacher: nn.Module):
    """With several processes (`accelerate launch` / torchrun sets WORLD_SIZE), wrap with accelerate (DDP/FSDP)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return model, 0, 1, None
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available())  # CPU processes talk over gloo
    if acc.num_processes <= 1:
        return model, 0, 1, None
    wrapped, _ = acc.prepare(model, opt)  # moves the student to this process' device
    teacher.to(acc.device)
    return wrapped, acc.process_index, acc.num_processes, acc


def _state(step: int, cfg: RecoverConfig, params: dict[str, nn.Parameter], opt, sched, keeper: MaskKeeper,
           freezer: Freezer, losses: list[float]) -> dict:
    return {
        "step": step,
        "settings": {k: v for k, v in cfg.settings().items() if k not in _RESUME_FREE},
        "params": {n: p.detach().cpu().clone() for n, p in params.items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "masks": keeper.state(),
        "freezer": freezer.state(),
        "losses": list(losses),
    }


@torch.no_grad()
def _restore(path: Path, cfg: RecoverConfig, params: dict[str, nn.Parameter], opt, sched,
             keeper: MaskKeeper, freezer: Freezer) -> tuple[int, list[float]]:
    state = ckpt.load(path)
    now = {k: v for k, v in cfg.settings().items() if k not in _RESUME_FREE}
    diff = {k: (state["settings"].get(k), v) for k, v in now.items() if state["settings"].get(k) != v}
    if diff:
        what = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {path} was made with other settings ({what}); "
                         "use the same settings, another checkpoint folder, or resume=False")
    missing = set(params) ^ set(state["params"])
    if missing:
        raise ValueError(f"checkpoint {path} does not match this model (parameters differ: {sorted(missing)[:3]} ...)")
    for n, p in params.items():
        p.copy_(state["params"][n])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    keeper.load(state["masks"])
    freezer.load(state["freezer"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), list(state["losses"])
