"""Streaming pruning (models/offload.py) against its peak-memory targets, each run in a process of its own.

    python benchmarks/streaming.py make                 # the random Llama-3-8B-shaped checkpoint, once (16 GB, bf16)
    flock /work/heavy.lock nice -n 5 python benchmarks/streaming.py run [--cases ...]
    python benchmarks/streaming.py clean                # delete the generated checkpoints and outputs

Cases (`--cases`, default all):
- qwen: Qwen2.5-Coder-1.5B (BENCHMARK.md) pruned by SparseGPT 50 %, target peak RSS <= 2.5 GB; read from the
  bundled name when this trimformer has it, else from its cached HF copy, else skipped with the reason.
- llama8b-wanda, llama8b-sparsegpt: a random-weight model of Llama-3-8B's shape (32 blocks, hidden 4096, 32 query /
  8 KV heads, FFN 14336, vocab 128,256, bf16, 16 GB) pruned 50 % on 4 calibration windows of 512 tokens, target peak
  RSS <= 4 GB; the checkpoint is then reloaded streamed and every projection checked for exactly 50 % zeros.
- depth8, depth16 (depthN for any N up to the model's blocks): the same model cut to its first N blocks (the same
  shard files), SparseGPT; depthN-wanda for Wanda. Peak RSS must not grow with depth. `make --blocks 16` / `run
  --blocks 16` write and use a 16-block model of the same width (9 GB) when only the depth cases are wanted.

Every run prints the estimate made before it started next to the measured peak RSS of its process, wall time and
the bytes read. Results: benchmarks/results/streaming.md (and .json), rewritten by each run; commands and history go in streaming_notes.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, write_results  # benchmarks/ is on sys.path when run as a script

ROOT = Path(os.environ.get("TRIMFORMER_BENCH", "/work/cache/trimformer-bench"))
GB = 1e9
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
TARGETS = {"qwen": 2.5, "llama8b-wanda": 4.0, "llama8b-sparsegpt": 4.0, "depth8": 4.0, "depth16": 4.0}
METHODS = ("wanda", "sparsegpt")


def case_name(text: str) -> str:
    """A case of TARGETS, or depthN / depthN-METHOD."""
    depth, _, method = text.removeprefix("depth").partition("-")
    if text in TARGETS or (text.startswith("depth") and depth.isdigit() and int(depth) > 0 and method in ("", *METHODS)):
        return text
    raise argparse.ArgumentTypeError(f"unknown case {text!r}: one of {', '.join(TARGETS)}, or depthN[-wanda|-sparsegpt]")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make(root: Path = ROOT, blocks: int = 32) -> Path:
    """Write the random Llama-3-8B-shaped checkpoint (one shard per block); `blocks` < 32 writes only the first
    blocks (a shallower model of the same width, for the depth cases when disk or time is short)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig

    from trimformer.models import shards
    from trimformer.models.load import streamable

    folder = root / ("llama3-8b-random" if blocks == 32 else f"llama3-8b-random-{blocks}b")
    if (folder / shards.INDEX).is_file():
        return folder
    need = (2.2 + 0.44 * blocks) * GB  # embeddings and head, and 0.44 GB per block in bf16
    free = shutil.disk_usage(root.parent if not root.exists() else root).free
    if free < need * 2.2:  # the checkpoint, and one pruned copy of it at a time
        sys.exit(f"not enough disk: {free / GB:.0f} GB free, {need * 2.2 / GB:.0f} GB needed (model + one output)")
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": blocks}, dtype="bfloat16")
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(streamable("smollm2-135m")).save_pretrained(tmp)  # 49,152 ids < 128,256
    g = torch.Generator().manual_seed(0)
    H, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (H // cfg.num_attention_heads)  # 8 KV heads of 128

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    parts = [{"model.embed_tokens.weight": lambda: rand(V, H)}]
    for i in range(blocks):
        p = f"model.layers.{i}."
        parts.append({p + "input_layernorm.weight": lambda: torch.ones(H, dtype=torch.bfloat16),
                      p + "self_attn.q_proj.weight": lambda: rand(H, H), p + "self_attn.k_proj.weight": lambda: rand(kv, H),
                      p + "self_attn.v_proj.weight": lambda: rand(kv, H), p + "self_attn.o_proj.weight": lambda: rand(H, H),
                      p + "post_attention_layernorm.weight": lambda: torch.ones(H, dtype=torch.bfloat16),
                      p + "mlp.gate_proj.weight": lambda: rand(F, H), p + "mlp.up_proj.weight": lambda: rand(F, H),
                      p + "mlp.down_proj.weight": lambda: rand(H, F)})
    parts.append({"model.norm.weight": lambda: torch.ones(H, dtype=torch.bfloat16), "lm_head.weight": lambda: rand(V, H)})
    weight_map, total = {}, 0
    for n, part in enumerate(parts):
        name = f"model-{n + 1:05d}-of-{len(parts):05d}.safetensors"
        tensors = {k: f() for k, f in part.items()}
        shards.write(tmp / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        print(f"\rwrote {name} ({total / GB:.1f} GB)", end="", file=sys.stderr)
    print(file=sys.stderr)
    (tmp / shards.INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    os.replace(tmp, folder)
    return folder


def cut(folder: Path, depth: int) -> Path:
    """The first `depth` blocks of `folder` as a checkpoint of its own (symbolic links to the same shards)."""
    from trimformer.models import shards

    out = folder.with_name(f"{folder.name}-d{depth}")
    if (out / shards.INDEX).is_file():
        return out
    out.mkdir(exist_ok=True)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = depth
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in folder.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    index = json.loads((folder / shards.INDEX).read_text())
    keep = {k: v for k, v in index["weight_map"].items()
            if ".layers." not in k or int(k.split(".layers.")[1].split(".")[0]) < depth}
    for f in set(keep.values()):
        if not (out / f).exists():
            (out / f).symlink_to(folder / f)
    total = sum(e.nbytes for f in set(keep.values()) for e in shards.read_header(out / f).values())
    (out / shards.INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": keep}, indent=1))
    return out


def qwen_source() -> tuple[str | None, str]:
    """Where Qwen2.5-Coder-1.5B comes from here, or None and why not."""
    from trimformer.models.load import BUNDLED, cache_dir

    name = "qwen2.5-coder-1.5b"
    if name in BUNDLED:
        return name, "bundled"
    if (cache_dir(name) / "config.json").is_file():
        return str(cache_dir(name)), "cached HF copy"
    return None, (f"{name} is not a bundled model of this trimformer and has no cached HF copy in "
                  f"{cache_dir(name)}: install its parts (BENCHMARK.md) with a trimformer that bundles it")


def child_prune(args: argparse.Namespace) -> None:
    """One pruning run in this process; prints a JSON line with its figures."""
    import torch

    from trimformer import pipeline
    from trimformer.methods import Recipe

    torch.set_num_threads(args.threads)
    base = peak_rss()
    job = pipeline.Job(model=args.model, recipe=Recipe.one(args.method, sparsity=0.5), out=args.out, overwrite=True,
                       calib_windows=args.windows, calib_length=args.length, evaluation=None, device="cpu",
                       dtype=args.dtype, offload="disk")
    lines = []
    fp, _ = pipeline.plan(job, job.recipe.build(), torch.device("cpu"))
    t0 = time.perf_counter()
    result = pipeline.run(job, say=lambda *a: lines.append(" ".join(map(str, a))))
    wall = time.perf_counter() - t0
    off = result.model.trimformer_offload
    print(json.dumps({"wall_s": wall, "peak_rss": peak_rss(), "rss_after_imports": base, "reads": off.reads,
                      "spilled": off.spilled, "estimate_memory": fp.streamed, "estimate_disk": fp.disk,
                      "estimate_in_memory": fp.in_memory, "model_bytes": fp.model, "said": lines}))


def child_verify(args: argparse.Namespace) -> None:
    """Reload a pruned checkpoint streamed and measure every projection's share of zeros."""
    import torch

    from trimformer import anatomy_of
    from trimformer.models.load import load
    from trimformer.models.offload import onload

    model = load(args.model, dtype=args.dtype, offload="disk")
    shares = {}
    for b in anatomy_of(model).blocks:
        with onload(b.module), torch.no_grad():
            shares.update({p.name: 1 - p.weight.count_nonzero().item() / p.weight.numel()
                           for p in b.projections().values()})
    print(json.dumps({"layers": len(shares), "min": min(shares.values()), "max": max(shares.values()),
                      "exact": all(v == 0.5 for v in shares.values()), "peak_rss": peak_rss()}))


def run_child(*argv: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> None:
    rows = []
    work = ROOT / "out"
    for case in args.cases:
        dtype, method = "bfloat16", "sparsegpt"
        if case == "qwen":
            model, how = qwen_source()
            if model is None:
                print(f"qwen: skipped: {how}")
                rows.append({"case": case, "skipped": how})
                continue
            dtype = args.qwen_dtype
        else:
            depth, _, suffix = case.removeprefix("depth").partition("-")
            full = make(blocks=32 if case.startswith("llama8b") else args.blocks)
            if not case.startswith("llama8b") and int(depth) > args.blocks:
                sys.exit(f"{case}: the model has {args.blocks} blocks; use --blocks {depth} or more")
            model = str(full if case.startswith("llama8b") else cut(full, int(depth)))
            method = "wanda" if case == "llama8b-wanda" else suffix or "sparsegpt"
        out = work / case
        print(f"{case}: {method} 50 % of {model} ({dtype}) ...", flush=True)
        r = run_child("child-prune", "--model", model, "--method", method, "--out", str(out), "--dtype", dtype,
                      "--windows", str(args.windows), "--length", str(args.length), "--threads", str(args.threads))
        if "error" not in r:
            r["verify"] = run_child("child-verify", "--model", str(out), "--dtype", dtype)
        shutil.rmtree(out, ignore_errors=True)
        r.update(case=case, method=method, model=model, dtype=dtype, target_gb=TARGETS.get(case, 4.0))
        print(json.dumps({k: v for k, v in r.items() if k != "said"}), flush=True)
        rows.append(r)
    dest = Path(args.out)
    # the cases run now replace their earlier rows; the others' rows are kept (a run of one case adds to the table)
    done = {r["case"] for r in rows}
    old = json.loads(dest.with_suffix(".json").read_text()) if dest.with_suffix(".json").exists() else []
    rows = [r for r in old if r.get("case") not in done] + rows
    write_results(dest, rows, table(rows, args))
    print(table(rows, args))


def table(rows: list[dict], args: argparse.Namespace) -> str:
    out = [f"# Streaming pruning: peak RSS per run ({args.windows} windows x {args.length} tokens, "
           f"{args.threads} threads, CPU)\n",
           "| case | method | dtype | estimate before start | measured peak RSS | target | wall | read from disk | "
           "reloaded: zeros per projection |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "skipped" in r or "error" in r:
            out.append(f"| {r['case']} | | | | {r.get('skipped') or r.get('error')} | | | | |")
            continue
        if r.get("partial"):
            out.append(f"| {r['case']} | | | | stopped after {r['stopped_after_s']} s: {r['peak_rss_so_far'] / GB:.2f} GB so far "
                       f"| | | | {r.get('note', '')} |")
            continue
        v = r.get("verify", {})
        check = (f"{v['layers']} layers, {v['min']:.4f}-{v['max']:.4f}{' (exactly 0.5)' if v.get('exact') else ''}, "
                 f"peak {v['peak_rss'] / GB:.2f} GB") if "layers" in v else v.get("error", "")
        out.append(f"| {r['case']} | {r['method']} 50 % | {r['dtype']} | {r['estimate_memory'] / GB:.2f} GB memory, "
                   f"{r['estimate_disk'] / GB:.1f} GB disk (in memory: {r['estimate_in_memory'] / GB:.1f} GB) | "
                   f"**{r['peak_rss'] / GB:.2f} GB** | <= {r['target_gb']} GB | {r['wall_s']:.0f} s | "
                   f"{r['reads'] / GB:.1f} GB | {check} |")
    for method in METHODS:  # peak RSS against depth: it should stay flat
        depth = sorted((int(r["case"].removeprefix("depth").split("-")[0]), r["peak_rss"]) for r in rows
                       if r["case"].startswith("depth") and r.get("method") == method and "peak_rss" in r)
        if len(depth) > 1:
            out.append(f"\n{method} peak RSS against depth: " + ", ".join(f"{d} blocks {p / GB:.2f} GB" for d, p in depth)
                       + f" (x{depth[-1][1] / depth[0][1]:.2f} for x{depth[-1][0] / depth[0][0]:.0f} the blocks).")
    out.append("\nPeak RSS: `getrusage(RUSAGE_SELF).ru_maxrss` of the process that ran the whole job (imports, load, "
               "calibration, pruning, writing); the reload check runs in a process of its own.")
    out.append("\nCommands, dates, machine load and history: streaming_notes.md (not rewritten by a run).")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--blocks", type=int, default=32, help="blocks of the random model (32: Llama-3-8B's depth)")
    r = sub.add_parser("run")
    r.add_argument("--cases", nargs="+", default=list(TARGETS), type=case_name)
    r.add_argument("--blocks", type=int, default=32, help="blocks of the random model the depth cases cut")
    r.add_argument("--out", default=str(RESULTS / "streaming"), help="results: OUT.json and OUT.md")
    r.add_argument("--windows", type=int, default=4)
    r.add_argument("--length", type=int, default=512)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--qwen-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    sub.add_parser("clean")
    c = sub.add_parser("child-prune")
    for a in ("--model", "--method", "--out", "--dtype"):
        c.add_argument(a, required=True)
    c.add_argument("--windows", type=int, default=4)
    c.add_argument("--length", type=int, default=512)
    c.add_argument("--threads", type=int, default=2)
    v = sub.add_parser("child-verify")
    v.add_argument("--model", required=True)
    v.add_argument("--dtype", required=True)
    args = p.parse_args()
    if args.cmd == "make":
        print(make(blocks=args.blocks))
    elif args.cmd == "run":
        run(args)
    elif args.cmd == "clean":
        shutil.rmtree(ROOT, ignore_errors=True)
        print(f"removed {ROOT}")
    elif args.cmd == "child-prune":
        child_prune(args)
    else:
        child_verify(args)


if __name__ == "__main__":
    main()
