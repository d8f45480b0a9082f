"""Recovery benchmark (P1-style, shortened for a contended 2-core CPU) on smollm2-135m.

    PYTHONPATH=src python benchmarks/recover.py            # Wanda 50% -> benchmarks/results/recover.{json,md}
    PYTHONPATH=src python benchmarks/recover.py --mode width --minutes 30   # width cut to 70% of the
                                                           # parameters + distillation -> recover_width.{json,md}
    PYTHONPATH=src python benchmarks/recover.py --mode width --dry          # a few-minute smoke run

Dense teacher, Wanda 50% (unstructured) student before recovery, after full fine-tuning of the blocks, and
after LoRA; quality on windows of the evaluation pool (never trained on); training tokens/s; peak memory of
each training run, measured in its own process (VmHWM), total and above the loaded models.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, write_results  # benchmarks/ is on sys.path when run as a script

from trimformer.evaluate import Reference
from trimformer.export.hf import save_pretrained


def setup(args: argparse.Namespace):
    """Teacher, tokenizer, calibration pool, held-out evaluation windows, the teacher's Reference on them, dense row."""
    import trimformer

    teacher, tok = trimformer.load(args.teacher, with_tokenizer=True)
    calib_pool, eval_pool = trimformer.data.doc_pools(tok)
    ev = trimformer.data.windows(eval_pool, args.eval_windows, args.seq_len, what="evaluation pool")  # held out
    ref = Reference(teacher, ev)  # quality: ref.score(model): kl (dense || model), top1_agree, ppl
    return teacher, tok, calib_pool, ev, ref, {"dense": ref.score(teacher)}


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


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
                        loss_chunk=args.loss_chunk, release_memory=not args.keep_allocator)
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
    cmd += ["--keep-allocator"] if "+glibc" in kind else []
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
                    "checkpointing on / off; default on for LoRA only), +whole (whole logits, not the chunked loss) and "
                    "+glibc (release_memory=False: glibc's default allocator thresholds)")
    ap.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)  # (worker)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--gc-run", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--loss-chunk", type=int, default=32, help="tokens per chunk of the fused head loss")
    ap.add_argument("--keep-allocator", action="store_true", help=argparse.SUPPRESS)  # (worker: release_memory=False)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--loss", default="kl")
    ap.add_argument("--stem", default=None, help="results file name (default recover[_2of4])")
    ap.add_argument("--pattern", default="unstructured", help="Wanda pattern: unstructured (50%%) or 2:4")
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--mode", choices=["wanda", "width"], default="wanda",
                    help="wanda: Wanda 50%% + full / LoRA runs (memory per process); width: a width cut + distillation")
    ap.add_argument("--keep", type=float, default=0.7, help="width mode: share of parameters kept")
    ap.add_argument("--parts", default="ffn", help="width mode: ffn, heads or ffn,heads")
    ap.add_argument("--minutes", type=float, default=30.0, help="width mode: training time budget")
    ap.add_argument("--steps-max", type=int, default=2000, help="width mode: steps the LR schedule spans")
    ap.add_argument("--pruned-cache", default=None, help="width mode: folder holding the cut model (made if absent)")
    ap.add_argument("--dry", action="store_true", help="width mode: tiny settings, a few minutes in all")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.mode == "width":
        return width(args)

    import trimformer

    t_start = time.perf_counter()
    teacher, tok, calib_pool, ev, ref, rows = setup(args)

    student = trimformer.load(args.teacher)
    calib = trimformer.data.windows(calib_pool, args.calib_windows, args.seq_len, what="calibration pool")
    t0 = time.perf_counter()
    label = "wanda50" if args.pattern == "unstructured" else f"wanda{args.pattern}"
    trimformer.prune_(student, trimformer.build("wanda", {"sparsity": 0.5, "pattern": args.pattern}), calibration=calib)
    prune_s = time.perf_counter() - t0
    rows[label] = {**ref.score(student), **sparsity(student, args.pattern)}
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
            rows[f"{label}+{kind}"] = {**ref.score(healed), **sparsity(healed, args.pattern, pruned_zeros)}
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
    stem = args.stem or ("recover" if args.pattern == "unstructured" else f"recover_{args.pattern.replace(':', 'of')}")
    write_results(RESULTS / stem, result, markdown(result))
    print(markdown(result))


def width(args: argparse.Namespace) -> None:
    """Width cut to `keep` of the parameters (structure method 'width'), then distillation for `minutes`."""
    import trimformer
    from trimformer import export as structure_export
    from trimformer.recover import RecoverConfig, recover_

    if args.dry:
        args.seq_len, args.calib_windows, args.eval_windows, args.minutes = 64, 2, 2, min(args.minutes, 1.0)
    t_start = time.perf_counter()
    teacher, tok, calib_pool, ev, ref, rows = setup(args)
    method = {"target": f"params={args.keep}", "parts": args.parts}
    cached = args.pruned_cache and Path(args.pruned_cache, "config.json").is_file()
    t0 = time.perf_counter()
    if cached:
        student = trimformer.load(args.pruned_cache)
        prune_s = json.loads(Path(args.pruned_cache, "bench_prune.json").read_text())["prune_seconds"]
    else:
        student = trimformer.load(args.teacher)
        calib = trimformer.data.windows(calib_pool, args.calib_windows, args.seq_len, what="calibration pool")
        trimformer.prune_(student, trimformer.build("width", method), calibration=calib)
        prune_s = time.perf_counter() - t0
        if args.pruned_cache:
            structure_export.save(student, args.pruned_cache, overwrite=True,
                                  extra_files={"bench_prune.json": {"prune_seconds": prune_s, "method": method,
                                                                    "calib_windows": args.calib_windows,
                                                                    "seq_len": args.seq_len}})
    n_dense = sum(p.numel() for p in teacher.parameters())
    n_cut = sum(p.numel() for p in student.parameters())
    label = f"width{args.keep:g}"
    rows[label] = {**ref.score(student), "params_ratio": n_cut / n_dense}
    data = trimformer.data.windows(calib_pool, calib_pool.numel() // args.seq_len, args.seq_len, what="calibration pool")
    cfg = RecoverConfig(steps=args.steps_max, batch_size=args.batch_size, lr=args.lr, warmup_steps=10,
                        loss=args.loss, max_minutes=args.minutes, loss_chunk=args.loss_chunk)
    recover_(student, teacher, data, cfg)
    r = student.trimformer_history[-1]["result"]
    rows[f"{label}+recover"] = {**ref.score(student), "params_ratio": n_cut / n_dense}
    gap0, gap1 = rows[label]["kl"], rows[f"{label}+recover"]["kl"]
    result = {
        "model": args.teacher, "mode": "width", "method": method, "args": vars(args), "prune_seconds": prune_s,
        "pruned_from_cache": bool(cached),
        "eval": f"{args.eval_windows} windows x {args.seq_len} tokens from the start of the evaluation pool (never trained on)",
        "calibration": f"{args.calib_windows} windows x {args.seq_len} tokens from the calibration pool (width cut)",
        "training_data": f"{data.shape[0]} non-overlapping windows of the calibration pool, shuffled per epoch",
        "training": {"settings": cfg.settings(), "steps_run": r["steps_run"], "stopped": r["stopped"],
                     "train_seconds": r["train_seconds"], "tokens_per_s": r["tokens_per_s"],
                     "tokens_seen": r["steps_run"] * args.batch_size * args.seq_len,
                     "loss_first_last": [r["losses"][0], r["losses"][-1]] if r["losses"] else None},
        "quality": rows, "kl_gap_closed": 1.0 - gap1 / gap0,
        "ppl_improved": rows[f"{label}+recover"]["ppl"] < rows[label]["ppl"],
        "total_seconds": time.perf_counter() - t_start, "torch_threads": torch.get_num_threads(),
        "command": "PYTHONPATH=src python benchmarks/recover.py " + " ".join(sys.argv[1:]),
    }
    stem = args.stem or ("recover_width_dry" if args.dry else "recover_width")
    write_results(RESULTS / stem, result, width_markdown(result))
    print(width_markdown(result))


def width_markdown(r: dict) -> str:
    t, s = r["training"], r["training"]["settings"]
    lines = [
        f"# Recovery on {r['model']}: width cut {r['method']} + distillation", "",
        f"Command: `{r['command']}`  ", f"Evaluation: {r['eval']}.  ", f"Cut calibration: {r['calibration']}"
        f"{' (cut model reused from --pruned-cache)' if r['pruned_from_cache'] else ''}; cut took {r['prune_seconds']:.0f} s.  ",
        f"Training data: {r['training_data']}. Threads: {r['torch_threads']} (shared, contended machine).  ",
        f"Training: loss {s['loss']}, lr {s['lr']:g} (warm-up {s['warmup_steps']}, cosine over {s['steps']} steps or "
        f"{s['max_minutes']:g} min, whichever is further along), batch {s['batch_size']} x {r['args']['seq_len']}; "
        f"{t['steps_run']} steps, {t['tokens_seen']} tokens in {t['train_seconds'] / 60:.1f} min "
        f"({t['tokens_per_s']:.1f} tokens/s){'; ' + t['stopped'] if t['stopped'] else ''}.", "",
        "| model | params ratio | kl vs dense | top-1 agree | ppl (held-out) |", "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, row in r["quality"].items():
        lines.append(f"| {name} | {row.get('params_ratio', 1.0):.3f} | {row['kl']:.4f} | {row['top1_agree']:.3f} | {row['ppl']:.2f} |")
    lines += ["", f"- kl gap to dense closed by recovery: {r['kl_gap_closed']:.1%} (target >= 50%)",
              f"- held-out ppl improved: {r['ppl_improved']}", ""]
    return "\n".join(lines)


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
    lines += ["", "| run | steps | batch x seq | lr | act. checkpointing | loss chunk (0: whole logits) | release memory | tokens/s | "
              "peak RSS MiB | peak above loaded MiB | kl gap closed |",
              "| --- | ---: | --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for k, run in r["runs"].items():
        s = run["settings"]
        above = run["peak_above_loaded_mib"]
        lines.append(f"| {k}{' (r=' + str(s['lora_rank']) + ')' if s['lora_rank'] else ''} | {s['steps']} | {s['batch_size']} x {r['args']['seq_len']} | "
                     f"{s['lr']:g} | {run.get('checkpointing', s['gradient_checkpointing'])} | {s.get('loss_chunk', 0)} | {s.get('release_memory', False)} | "
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
