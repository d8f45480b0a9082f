"""`recover_(student, teacher, data, RecoverConfig(...))`: distillation fine-tuning that keeps the cuts.

The objective of a step: the teacher's targets for the step's windows (on the fly, or from the cache),
then the loss (KL / hidden / LM, recover/loss.py). It runs on the training loop (recover/loop.py) with
the callbacks the settings ask for: masks kept, gradual magnitude pruning, group lasso, freezing, the
teacher cache, a time limit, memory release, checkpoints. The batch order is a function of the seed and
the step, so a resumed run repeats the same next step.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from ..models import anatomy_of
from ..steps import FilterFn
from . import lora as lora_mod
from .cache import TeacherTargets
from .checkpoint import Checkpoints, resume_hint
from .config import RESUME_FREE, RecoverConfig
from .freeze import Freezer
from .loop import Callback, NonFiniteLossError, Run, TimeLimit, train_
from .loss import Distiller
from .masks import GradualMagnitude, KeepMasks, MaskKeeper
from .memory import ReleaseMemory
from .regularize import GroupLasso


def recover_(
    student: nn.Module,
    teacher: nn.Module,
    data: torch.Tensor,
    config: RecoverConfig | None = None,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    filter_fn: FilterFn | None = None,
    progress: bool = True,
) -> nn.Module:
    """Fine-tune `student` in place to match `teacher` on token windows `data` (n, T); returns the student.

    `masks`: parameter name -> bool keep-mask, added to the masks found from zeros in the trained weights.
    `filter_fn(module, name) -> bool`: only parameters held by modules it accepts train (with LoRA: only the
    block projections it accepts get adapters). A summary (losses, tokens/s, seconds) is appended to
    `student.trimformer_history`.
    """
    cfg = config or RecoverConfig()
    S, o = cfg.schedule, cfg.objective
    data = _check_windows(data, student)
    s_anat, t_anat = anatomy_of(student), anatomy_of(teacher)
    if "kl" in o.terms and s_anat.vocab_size != t_anat.vocab_size:
        raise ValueError(f"student and teacher vocabularies differ ({s_anat.vocab_size} vs {t_anat.vocab_size}); "
                         "KL distillation needs the same tokenizer")
    distill = Distiller(s_anat, t_anat, o.terms, o.temperature, o.hidden_weight, o.lm_weight, o.hidden_map, o.chunk)

    prefix = s_anat.blocks_path + "."
    candidates = _trainable(student, prefix, cfg.train, filter_fn)
    adapted = None if filter_fn is None else {n for n, _ in s_anat.projections() if filter_fn(student.get_submodule(n), n)}
    if cfg.lora.rank and adapted == set():
        raise ValueError("filter_fn accepts none of the block projections that LoRA adapts; accept some of them, "
                         "or train without LoRA (lora_rank=None)")
    keeper = MaskKeeper(student, candidates, masks, store_found=not cfg.lora.rank)
    masked = list(keeper.zero_names)
    freezer = Freezer({b.index: {n: p for n, p in candidates.items() if n.startswith(f"{prefix}{b.index}.")}
                       for b in s_anat.blocks}, cfg.freeze.fraction, max(int(cfg.freeze.at * S.steps), 1))
    callbacks: list[Callback] = [ReleaseMemory()] if cfg.releasing_memory else []

    torch.manual_seed(S.seed)
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    was_training, had_gc, teacher_training = student.training, _checkpointing(student, "is"), teacher.training
    teacher.eval()  # no dropout in the targets
    adapters: lora_mod.LoRA | None = None
    t0 = time.perf_counter()
    try:
        if cfg.lora.rank:
            keeper.apply_()  # given masks reach the frozen base weights; from here on their zeros are the masks
            adapters = lora_mod.attach(student, s_anat, set(keeper.zero_names), cfg.lora.rank,
                                       cfg.lora.alpha or 2.0 * cfg.lora.rank, only=adapted)
            keeper.masks = {}  # (no copy kept: the frozen weights hold them)
            params = {n: p for n, p in student.named_parameters() if p.requires_grad}
        else:
            for n, p in student.named_parameters():
                p.requires_grad_(n in candidates)
            params = candidates
        if cfg.checkpointing:
            _checkpointing(student, "enable")
        student.train()
        opt = torch.optim.AdamW(params.values(), lr=cfg.learning_rate, weight_decay=S.weight_decay)
        model, rank, world, acc = _distributed(student, opt, teacher)
        barrier = acc.wait_for_everyone if acc else None
        device = next(student.parameters()).device

        callbacks.append(KeepMasks(keeper))
        if cfg.gmp.sparsity is not None:
            names = [p.name + ".weight" for _, p in s_anat.projections() if p.name + ".weight" in candidates]
            callbacks.append(GradualMagnitude(keeper, names, cfg.gmp.sparsity, int(cfg.gmp.start * S.steps),
                                              int(cfg.gmp.end * S.steps), cfg.gmp.every))
        cache = None
        if cfg.teacher_cache:
            cache = TeacherTargets(cfg.teacher_cache, distill, teacher, data, batch_size=S.batch_size, rank=rank,
                                   barrier=barrier, progress=progress)
            callbacks.append(cache)
        if S.max_minutes:
            callbacks.append(TimeLimit(S.max_minutes, agree=_over_processes("max", acc.device) if acc else None))
        lasso = GroupLasso(s_anat, cfg.lasso.parts, cfg.lasso.strength) if cfg.lasso.strength else None
        callbacks += [c for c in (lasso, freezer if cfg.freeze.fraction else None) if c is not None]
        B, T = S.batch_size, data.shape[1]
        callbacks.append(_Throughput(B * T * world))
        ckpts = None
        if cfg.checkpoint.dir:
            same = {k: v for k, v in cfg.settings().items() if k not in RESUME_FREE}
            ckpts = Checkpoints(cfg.checkpoint.dir, cfg.checkpoint.every, cfg.checkpoint.keep, cfg.checkpoint.resume,
                                same, rank=rank, barrier=barrier)
            callbacks.append(ckpts)  # (last: it saves what the others did this step)

        def objective(step: int) -> tuple[torch.Tensor, dict[str, float]]:
            rows = window_rows(data.shape[0], step, B, S.seed, rank, world)
            ids = data[rows].to(device)  # (B, T)
            return distill(model, teacher, ids, cache.get(rows) if cache else None)

        try:
            run = train_(objective, params, opt, S, callbacks, backward=acc.backward if acc else None,
                         mean=_over_processes("mean", acc.device) if acc else None, progress=progress and rank == 0,
                         desc="recover")
        except NonFiniteLossError as e:
            raise NonFiniteLossError(f"{e}: {resume_hint(ckpts.last if ckpts else None)}") from None
        if adapters is not None:
            adapters.merge_()
            adapters = None
    finally:
        if adapters is not None:  # an error: drop the adapters, leave the model as the last completed step
            adapters.discard_()
        for n, p in student.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        if cfg.checkpointing and not had_gc:
            _checkpointing(student, "disable")
        student.train(was_training)
        teacher.train(teacher_training)
    ran = run.step - run.resumed_from
    result = {
        "steps_run": ran, "resumed_from": run.resumed_from, "stopped": run.stopped, "losses": run.losses,
        "train_seconds": run.seconds, "tokens_per_s": (ran * B * T * world) / max(run.seconds, 1e-9),
        "frozen_blocks": freezer.frozen, "group_lasso": lasso.summary() if lasso is not None else None,
        "sparsity": {n: _zeros(student.get_parameter(n)) for n in sorted({*masked, *keeper.masks})},  # measured
    }
    history = getattr(student, "trimformer_history", [])
    history.append({"method": "recover", "settings": cfg.settings(), "seconds": time.perf_counter() - t0, "result": result})
    student.trimformer_history = history
    return student


class _Throughput(Callback):
    """Tokens per second on the progress bar."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step, self.t0, self.first = tokens_per_step, None, 0

    def before_step(self, run: Run) -> None:
        if self.t0 is None:
            self.t0, self.first = time.perf_counter(), run.step

    def after_step(self, run: Run) -> None:
        tokens = (run.step - self.first) * self.tokens_per_step
        run.postfix["tok_s"] = f"{tokens / max(time.perf_counter() - self.t0, 1e-9):.0f}"


def _trainable(model: nn.Module, prefix: str, train: str, filter_fn: FilterFn | None) -> dict[str, nn.Parameter]:
    """The parameters that may train: requiring grad, in the blocks (train='blocks') or anywhere ('all'),
    held by a module that `filter_fn` accepts."""
    owner = {f"{m_name}.{p_name}" if m_name else p_name: (m, m_name)  # parameter name -> (module, its name)
             for m_name, m in model.named_modules() for p_name, _ in m.named_parameters(recurse=False)}
    out = {n: p for n, p in model.named_parameters()
           if p.requires_grad and (train == "all" or n.startswith(prefix)) and (filter_fn is None or filter_fn(*owner[n]))}
    if not out:
        where = "in the blocks " if train == "blocks" else ""
        if filter_fn is not None:
            raise ValueError(f"nothing to train: filter_fn accepts no module that holds a trainable parameter {where}"
                             "(it is called as filter_fn(module, name) for every module, e.g. 'model.layers.0.mlp.up_proj')")
        raise ValueError(f"nothing to train: every parameter {where}is frozen")
    return out


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


_PERMS: dict[tuple[int, int, int], torch.Tensor] = {}


def window_rows(n: int, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Window indices of `step`: a function of (seed, step) only, reshuffled every epoch, so resuming needs no
    data state; with `world` processes, process `rank` takes its own share of the global batch."""
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


def _over_processes(op: str, device: torch.device):
    """t -> its mean or max over the processes (torch.distributed, which accelerate has started), on `device`
    (NCCL reduces only CUDA tensors)."""
    import torch.distributed as dist

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device, copy=True)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t if op == "max" else t / dist.get_world_size()

    return reduce


def _distributed(model: nn.Module, opt: torch.optim.Optimizer, teacher: nn.Module):
    """With several processes (`accelerate launch` / torchrun sets WORLD_SIZE), wrap with accelerate (DDP/FSDP)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return model, 0, 1, None
    from accelerate import Accelerator  # (slow to import: only when several processes run)

    acc = Accelerator(cpu=not torch.cuda.is_available())  # CPU processes talk over gloo
    if acc.num_processes <= 1:
        return model, 0, 1, None
    wrapped, _ = acc.prepare(model, opt)  # moves the student to this process' device
    teacher.to(acc.device)
    return wrapped, acc.process_index, acc.num_processes, acc
