"""GPU check: P1 SparseGPT 50 % and Wanda 50 % pruned on CUDA and on the CPU, side by side (a few minutes).

    python benchmarks/gpu_check.py                       # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --device cpu          # the same comparison CPU against CPU (checks this script)

For each model (smollm2-135m; qwen2.5-coder-1.5b when this trimformer bundles it and its parts are installed,
else skipped with the reason) and method, the same calibration windows (BENCHMARK.md P1 calibration pool, 16
windows of 512 tokens unless --windows) prune one copy on the CPU and one on `--device`; reported: pruning wall
time on each, the share of weights whose keep/prune decision agrees (overall and the worst projection), and on the
P1 evaluation windows KL(dense || pruned) and top-1 agreement of each copy, and KL between the two copies. Both
copies run at `--precision` (default auto: bf16 autocast where the device multiplies bf16 natively, statistics in
fp32), so differences come from the devices' arithmetic. Without CUDA (and no --device cpu) it exits with status 2
and says so. Writes --out (default benchmarks/results/gpu_check.md and .json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

MODELS = ["smollm2-135m", "qwen2.5-coder-1.5b"]
METHODS = ["sparsegpt", "wanda"]


def available(name: str) -> str | None:
    """None if `name` can be loaded here, else why not."""
    from trimformer.models.load import BUNDLED, ModelNotFoundError, bundled_path

    if name not in BUNDLED:
        return f"{name} is not bundled by this trimformer (it comes with the qwen2.5-coder-1.5b bundling)"
    try:
        bundled_path(name)
    except ModelNotFoundError as e:
        return str(e)
    return None


def masks_agree(a: torch.nn.Module, b: torch.nn.Module) -> tuple[float, float, str]:
    """Share of projection weights with the same keep/prune decision in `a` and `b`: overall, worst layer, its name."""
    from trimformer import anatomy_of

    same = total = 0
    worst, where = 1.0, ""
    for (name, p), (_, q) in zip(anatomy_of(a).projections(), anatomy_of(b).projections()):
        eq = int(((p.weight == 0).cpu() == (q.weight == 0).cpu()).sum())
        same, total = same + eq, total + p.weight.numel()
        if eq / p.weight.numel() < worst:
            worst, where = eq / p.weight.numel(), name
    return same / total, worst, where


def compare(load, method: str, device: torch.device, calib: torch.Tensor, evaluation: torch.Tensor,
            precision: str = "auto", progress: bool = False) -> dict:
    """Prune `load('cpu')` and `load(device)` with `method` on `calib`; compare masks and KL on `evaluation`.
    `load(device)` returns a fresh dense model on that device."""
    import trimformer
    from trimformer.evaluate.quality import kl_top1

    step = trimformer.build(method, {"sparsity": 0.5, "precision": precision})
    out: dict = {"method": method, "device": str(device)}
    pruned = []
    for name, where in (("cpu", torch.device("cpu")), ("device", device)):
        model = load(where)
        t0 = time.perf_counter()
        trimformer.prune_(model, step, calibration=calib, progress=progress)
        if where.type == "cuda":
            torch.cuda.synchronize(where)
        out[f"seconds_{name}"] = time.perf_counter() - t0
        pruned.append(model.to(device))
    cpu, dev = pruned
    out["mask_agree"], out["mask_agree_worst"], out["worst_layer"] = masks_agree(cpu, dev)
    dense = load(device)
    for name, model in (("cpu", cpu), ("device", dev)):
        r = kl_top1(model, dense, evaluation, progress)
        out[f"kl_{name}"], out[f"top1_{name}"] = r["kl"], r["top1_agree"]
    out["kl_between"] = kl_top1(dev, cpu, evaluation, progress)["kl"]
    out["kl_relative_difference"] = abs(out["kl_device"] - out["kl_cpu"]) / max(out["kl_cpu"], 1e-12)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| model | method | device | prune s (CPU / device) | masks agree (worst layer) | KL CPU-pruned | "
             "KL device-pruned | KL between | top-1 (CPU / device) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | | | skipped: {r['skipped']} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['method']} 50 % | {r['device']} | {r['seconds_cpu']:.1f} / "
                     f"{r['seconds_device']:.1f} | {100 * r['mask_agree']:.3f} % ({100 * r['mask_agree_worst']:.2f} % "
                     f"{r['worst_layer']}) | {r['kl_cpu']:.4f} | {r['kl_device']:.4f} | {r['kl_between']:.5f} | "
                     f"{100 * r['top1_cpu']:.1f} % / {100 * r['top1_device']:.1f} % |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (checks this script)")
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--windows", type=int, default=16, help="calibration windows of --length tokens (P1: 64)")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--kl-windows", type=int, default=16)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu_check"),
                   help="writes OUT.md and OUT.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, built for CUDA {torch.version.cuda}): run "
              "it on a GPU machine, or with --device cpu to check the script itself", file=sys.stderr)
        return 2
    import trimformer
    from trimformer import data

    rows = []
    for name in args.models:
        why = available(name)
        if why is not None:
            print(f"{name}: skipped: {why}", file=sys.stderr)
            rows.append({"model": name, "skipped": why})
            continue
        tok = trimformer.load(name, with_tokenizer=True)[1]
        calib = data.calibration_windows(tok, n=args.windows, length=args.length)
        evaluation = data.evaluation_windows(tok, n=args.kl_windows, length=args.length)
        for method in args.methods:
            r = compare(lambda where, n=name: trimformer.load(n, device=where), method, device, calib, evaluation,
                        args.precision)
            r.update(model=name, windows=args.windows, precision=args.precision,
                     gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)
            print(json.dumps(r), flush=True)
            rows.append(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    out.with_suffix(".md").write_text(f"# GPU check ({args.windows} calibration windows x {args.length}, precision "
                                      f"{args.precision})\n\n" + table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
