"""Recovery benchmark (P1-style, shortened for a contended 2-core CPU): smollm2-135m, Wanda 50% + distillation.

    PYTHONPATH=src python benchmarks/recover.py            # writes benchmarks/results/recover.{json,md}

Dense teacher, Wanda 50% (unstructured) student before recovery, after full fine-tuning of the blocks, and
after LoRA; quality on windows of the evaluation pool (never trained on); training tokens/s; peak memory of
each training run, measured in its own process (VmHWM), total and above the loaded models.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trimformer.export.hf import save_pretrained

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


@torch.no_grad()
def quality(model, windows: torch.Tensor, ref_logp: list[torch.Tensor]) -> dict[str, float]:
    """kl (dense || model), top-1 agreement and perplexity over the same windows, one forward each."""
    kl = agree = nll = 0.0
    count = 0
    for ids, p in zip(windows, ref_logp):
        q = F.log_softmax(model(input_ids=ids[None], use_cache=False).logits[0].float(), -1)  # (T, V)
        kl += F.kl_div(q, p, log_target=True, reduction="sum").item()
        agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
        nll += F.nll_loss(q[:-1], ids[1:], reduction="sum").item()
        count += ids.numel()
    n_pred = count - len(windows)
    return {"kl": kl / count, "top1_agree": agree / count, "ppl": math.exp(nll / n_pred)}


def zero_sets(model) -> dict[str, torch.Tensor]:
    import trimformer

    return {name: p.weight == 0 for name, p in trimformer.anatomy_of(model).projections()}


def sparsity(model, pattern: str, pruned: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Share of zeros; whether the pattern holds (the dense GGUF weights already hold ~33K exact zeros, so
    'holds' means at least half of every row, or at least 2 zeros in every group of 4); and whether the
    zeros are exactly those of the pruned model before recovery."""
    zeros = total = 0
    holds = True
    now = zero_sets(model)
    for Z in now.values():
        zeros += Z.sum().item()
        total += Z.numel()
        if pattern == "2:4":
            holds &= bool((Z.reshape(Z.shape[0], -1, 4).sum(-1) >= 2).all())  # (out, groups, 4)
        else:
            holds &= bool((Z.sum(1) >= Z.shape[1] // 2).all())
    out = {"sparsity": zeros / total, "pattern_holds": holds}
    if pruned is not None:
        out["same_zeros_as_pruned"] = all(torch.equal(now[n], pruned[n]) for n in pruned)
    return out


def worker(args: argparse.Namespace) -> None:
    """One training run in its own process, so its peak memory is its own."""
    import trimformer
    from trimformer.recover import RecoverConfig, recover_

    teacher, tok = trimformer.load(args.teacher, with_tokenizer=True)
    student = trimformer.load(args.student)
    calib_pool, _ = trimformer.data.doc_pools(tok)
    data = trimformer.data.windows(calib_pool, calib_pool.numel() // args.seq_len, args.seq_len, what="calibration pool")
    with torch.no_grad():  # own the weights (safetensors loads are memory-mapped and page in lazily)
        for m in (teacher, student):
            for prm in m.parameters():
                prm.data = prm.data.clone()
    gc.collect()
    base = rss_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak from here on is training's
        reset = True
    except OSError:
        reset = False
    gc_flag = {"on": True, "off": False, "default": None}[args.gc_run]
    cfg = RecoverConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=2,
                        lora_rank=args.lora_rank or None, loss=args.loss, gradient_checkpointing=gc_flag,
                        loss_chunk=args.loss_chunk)
    t0 = time.perf_counter()
    recover_(student, teacher, data, cfg)
    wall = time.perf_counter() - t0
    peak = rss_kib("VmHWM")
    r = student.trimformer_history[-1]["result"]
    save_pretrained(student, args.out)
    json.dump({"settings": cfg.settings(), "checkpointing": cfg.checkpointing, "train_windows": int(data.shape[0]), "wall_s": wall,
               "tokens_per_s": r["tokens_per_s"], "losses": r["losses"], "peak_rss_mib": peak / 1024,
               "loaded_rss_mib": base / 1024, "peak_above_loaded_mib": (peak - base) / 1024 if reset else None},
              open(Path(args.out) / "run.json", "w"))


def train(kind: str, student_dir: str, out: str, args: argparse.Namespace, steps: int, lora_rank: int | None) -> dict:
    """`kind`: full or lora, then optional '+gc' / '-gc' (activation checkpointing on / off instead of the
    default: on for LoRA only) and '+whole' (whole logits instead of the chunked head loss)."""
    cmd = [sys.executable, __file__, "--worker", "--student", student_dir, "--out", out, "--steps", str(steps),
           "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--loss", args.loss,
           "--lr", str(args.lora_lr if lora_rank else args.lr)]
    cmd += ["--lora-rank", str(lora_rank or 0)]  # 0: full fine-tuning
    cmd += ["--gc-run", "on" if "+gc" in kind else "off" if "-gc" in kind else "default"]
    cmd += ["--loss-chunk", "0" if "+whole" in kind else str(args.loss_chunk)]
    print(f"[{kind}] {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "TRIMFORMER_QUIET": os.environ.get("TRIMFORMER_QUIET", "")})
    return json.loads((Path(out) / "run.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--student", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--runs", default="full:20,lora:8",
                    help="training runs NAME:STEPS; NAME is full or lora, optionally followed by +gc / -gc (activation "
                    "checkpointing on / off; default on for LoRA only) and +whole (whole logits, not the chunked loss)")
    ap.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)  # (worker)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--gc-run", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--loss-chunk", type=int, default=128, help="tokens per chunk of the fused head loss")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--loss", default="kl")
    ap.add_argument("--stem", default=None, help="results file name (default recover[_2of4])")
    ap.add_argument("--pattern", default="unstructured", help="Wanda pattern: unstructured (50%%) or 2:4")
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=4)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import trimformer

    t_start = time.perf_counter()
    teacher, tok = trimformer.load(args.teacher, with_tokenizer=True)
    calib_pool, eval_pool = trimformer.data.doc_pools(tok)
    ev = trimformer.data.windows(eval_pool, args.eval_windows, args.seq_len, what="evaluation pool")  # held out
    with torch.no_grad():
        ref = [F.log_softmax(teacher(input_ids=w[None], use_cache=False).logits[0].float(), -1) for w in ev]
    rows = {"dense": quality(teacher, ev, ref)}

    student = trimformer.load(args.teacher)
    calib = trimformer.data.windows(calib_pool, args.calib_windows, args.seq_len, what="calibration pool")
    t0 = time.perf_counter()
    label = "wanda50" if args.pattern == "unstructured" else f"wanda{args.pattern}"
    trimformer.prune_(student, trimformer.build("wanda", {"sparsity": 0.5, "pattern": args.pattern}), calibration=calib)
    prune_s = time.perf_counter() - t0
    rows[label] = {**quality(student, ev, ref), **sparsity(student, args.pattern)}
    pruned_zeros = zero_sets(student)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="trimformer-recover-") as tmp:
        pruned_dir = f"{tmp}/pruned"
        save_pretrained(student, pruned_dir)
        del student
        for kind in args.runs.split(","):
            name, steps = kind.split(":")
            rank = args.lora_rank if name.startswith("lora") else None
            runs[name] = train(name, pruned_dir, f"{tmp}/{name}", args, int(steps), rank)
            kind = name
            healed = trimformer.load(f"{tmp}/{kind}")
            rows[f"{label}+{kind}"] = {**quality(healed, ev, ref), **sparsity(healed, args.pattern, pruned_zeros)}
            del healed
    result = {
        "model": args.teacher, "args": vars(args), "prune_seconds": prune_s,
        "eval": f"{args.eval_windows} windows x {args.seq_len} tokens from the start of the evaluation pool (never trained on)",
        "calibration": f"{args.calib_windows} windows x {args.seq_len} tokens from the calibration pool (Wanda)",
        "training_data": "non-overlapping windows of the calibration pool, shuffled per epoch",
        "quality": rows, "runs": runs, "total_seconds": time.perf_counter() - t_start,
        "torch_threads": torch.get_num_threads(),
        "command": "PYTHONPATH=src python benchmarks/recover.py " + " ".join(sys.argv[1:]),
    }
    gap0 = rows[label]["kl"]
    result["kl_gap_closed"] = {k: 1.0 - rows[f"{label}+{k}"]["kl"] / gap0 for k in runs}
    full = runs.get("full")
    result["peak_rss_over_full"] = {k: r["peak_rss_mib"] / full["peak_rss_mib"] for k, r in runs.items()} if full else {}
    if full and full["peak_above_loaded_mib"]:
        result["peak_above_loaded_over_full"] = {k: r["peak_above_loaded_mib"] / full["peak_above_loaded_mib"]
                                                 for k, r in runs.items() if r["peak_above_loaded_mib"] is not None}
    RESULTS.mkdir(exist_ok=True)
    stem = args.stem or ("recover" if args.pattern == "unstructured" else f"recover_{args.pattern.replace(':', 'of')}")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    q = r["quality"]
    lines = [
        f"# Recovery on {r['model']}: Wanda {r['args']['pattern']} 50% + distillation", "",
        f"Command: `{r['command']}`  ", f"Evaluation: {r['eval']}.  ", f"Pruning calibration: {r['calibration']}.  ",
        f"Training data: {r['training_data']}. Threads: {r['torch_threads']} (shared, contended machine).", "",
        "| model | kl vs dense | top-1 agree | ppl (held-out) | sparsity of block projections | pattern holds | zeros = pruned model's |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for name, row in q.items():
        sp = f"{row['sparsity']:.4f}" if "sparsity" in row else "0"
        lines.append(f"| {name} | {row['kl']:.4f} | {row['top1_agree']:.3f} | {row['ppl']:.2f} | {sp} | "
                     f"{row.get('pattern_holds', row.get('pattern_exact', '-'))} | {row.get('same_zeros_as_pruned', '-')} |")
    lines += ["", "| run | steps | batch x seq | lr | act. checkpointing | loss chunk (0: whole logits) | tokens/s | "
              "peak RSS MiB | peak above loaded MiB | kl gap closed |",
              "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for k, run in r["runs"].items():
        s = run["settings"]
        above = run["peak_above_loaded_mib"]
        lines.append(f"| {k}{' (r=' + str(s['lora_rank']) + ')' if s['lora_rank'] else ''} | {s['steps']} | {s['batch_size']} x {r['args']['seq_len']} | "
                     f"{s['lr']:g} | {run.get('checkpointing', s['gradient_checkpointing'])} | {s.get('loss_chunk', 0)} | "
                     f"{run['tokens_per_s']:.1f} | {run['peak_rss_mib']:.0f} | "
                     f"{'-' if above is None else f'{above:.0f}'} | {r['kl_gap_closed'][k]:.1%} |")
    for k, ratio in r["peak_rss_over_full"].items():
        if k != "full":
            above = r.get("peak_above_loaded_over_full", {}).get(k)
            lines.append(f"- {k} / full peak RSS: {ratio:.2f}" + ("" if above is None else f"; above the loaded models: {above:.2f}"))
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
