"""`trimformer recover PRUNED --teacher DENSE --data docs --steps 300 --out healed/`: distillation that keeps the cuts."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from . import check_out, parse_pairs
from .core import add_device_options


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recover",
        help="heal a pruned model by distillation from its dense teacher (masks and shapes are kept)",
        description="Fine-tune a pruned model to match its dense teacher (KL on logits, optional block "
        "hidden states and LM loss). Masks (zeros) and shapes are kept exactly; the result is saved atomically. "
        "An interrupted run resumes from OUT.checkpoints/ when started again with the same settings.",
    )
    p.add_argument("model", help="the pruned model: a trimformer/HF directory (or any name trimformer.load accepts)")
    p.add_argument("--teacher", required=True, help="the dense model it was cut from, e.g. smollm2-135m")
    p.add_argument("--data", default="docs",
                   help="training text: 'docs' (the built-in corpus' calibration half; never its evaluation half), "
                   "a text file, a folder of .txt/.md/.jsonl, or a JSONL file")
    p.add_argument("--data-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training window (default 256)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=None, help="default 1e-4 (full) or 1e-3 (LoRA)")
    p.add_argument("--loss", default="kl", help="'+'-joined terms of kl, hidden, lm (default kl)")
    p.add_argument("--lora-rank", type=int, default=None, help="train rank-r LoRA adapters (merged at the end)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute block activations in backward: less memory, more compute (default: on with LoRA)")
    p.add_argument("--loss-chunk", type=int, default=32,
                   help="tokens per chunk of the fused head + KL/LM loss (full logits never exist); 0: whole logits")
    p.add_argument("--teacher-cache", default=None, metavar="FILE.safetensors",
                   help="cache the teacher's targets (last hidden states; the logits are recomputed exactly from "
                   "them) for every window, computed once, reused by every epoch and later run")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop training after this many minutes (the LR schedule follows steps or time, whichever is ahead)")
    p.add_argument("--group-lasso", type=float, default=0.0, metavar="LAMBDA",
                   help="sparse then prune: group lasso on FFN neurons / heads (proximal step; full fine-tuning only; "
                   "Adam moves a group of n weights by up to lr*sqrt(n) a step, the shrink is lr*LAMBDA, so groups "
                   "die once LAMBDA nears sqrt(n): ~40 for smollm2-135m FFN neurons)")
    p.add_argument("--group-lasso-parts", default="ffn,heads", help="groups for --group-lasso: ffn, heads or ffn,heads")
    p.add_argument("--checkpoint-dir", default=None, help="default OUT.checkpoints (removed after success)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints from an earlier run")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any RecoverConfig setting by its flat name, e.g. --set temperature=2 --set gmp_sparsity=0.6 "
                   "(or nested: --set gmp.sparsity=0.6)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_device_options(p)
    p.set_defaults(func=cmd_recover)


def config_from_args(args: argparse.Namespace):
    from ..recover import RecoverConfig
    from ..registry import coerce_fields

    out = str(args.out).rstrip("/")
    settings = {
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "loss": args.loss,
        "lora_rank": args.lora_rank, "gradient_checkpointing": args.gradient_checkpointing,
        "loss_chunk": args.loss_chunk, "teacher_cache": args.teacher_cache, "max_minutes": args.max_minutes,
        "group_lasso": args.group_lasso, "group_lasso_parts": args.group_lasso_parts,
        "checkpoint_dir": args.checkpoint_dir or f"{out}.checkpoints", "checkpoint_every": args.checkpoint_every,
        "resume": not args.no_resume,
    }
    return RecoverConfig(**coerce_fields(RecoverConfig, {**settings, **parse_pairs(args.set)}))


def cmd_recover(args: argparse.Namespace) -> int:
    from .. import data as D
    from .. import load
    from ..export.hf import save_pretrained
    from ..progress import quiet
    from ..recover import NonFiniteLossError, recover_

    check_out(args.out, args.overwrite, args.model, args.teacher)  # fail now, not after the training
    cfg = config_from_args(args)
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {args.seq_len}")
    from ..models.load import resolve_device

    on = {"dtype": args.dtype, "device": resolve_device(args.device)}
    teacher, tok = load(args.teacher, with_tokenizer=True, **on)
    student = load(args.model, **on)
    if args.data == D.BUILTIN:
        ids = D.doc_pools(tok)[0]  # the calibration half only: the evaluation half stays unseen
    else:
        ids = D.tokenize(tok, D.read_text(args.data, args.data_field, "--data-field"))
    windows = D.windows(ids, max(ids.numel() // args.seq_len, 1), args.seq_len, what=f"training data {args.data!r}")
    print(f"recover: {windows.shape[0]} windows x {args.seq_len} tokens, {cfg.schedule.steps} steps of "
          f"{cfg.schedule.batch_size}, loss {cfg.objective.loss}, "
          f"{'LoRA r=' + str(cfg.lora.rank) if cfg.lora.rank else 'full fine-tuning of the blocks'}")
    try:
        recover_(student, teacher, windows, cfg, progress=not quiet())
    except NonFiniteLossError as e:
        print(f"trimformer: error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:  # several processes (accelerate launch / torchrun): the first writes
        return 0
    entry = student.trimformer_history[-1]
    r = entry["result"]
    if r["resumed_from"]:
        print(f"resumed from step {r['resumed_from']} ({cfg.checkpoint.dir})")
    save_pretrained(student, args.out, tokenizer=tok, overwrite=args.overwrite,
                    extra_files={"trimformer_recover.json": {**entry, "teacher": args.teacher, "data": args.data,
                                                              "seq_len": args.seq_len}})
    if args.checkpoint_dir is None:
        shutil.rmtree(cfg.checkpoint.dir, ignore_errors=True)
    first, last = (r["losses"][0], r["losses"][-1]) if r["losses"] else (float("nan"),) * 2
    print(f"loss {first:.4f} -> {last:.4f}, {r['tokens_per_s']:.0f} tokens/s; saved {args.out}")
    return 0
