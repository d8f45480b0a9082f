"""Plots over saved reports: quality vs cost frontier, per-layer sparsity. PNG via matplotlib (Agg)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..io import atomic_dir

COST_AXES = {  # name -> (label, getter)
    "nonzeros": ("non-zero parameters (share of dense)", lambda r: r["cost"]["nonzeros"] / r["cost"].get("nonzeros_reference", r["cost"]["nonzeros"])),
    "params": ("parameters (share of dense)", lambda r: r["cost"]["params"] / r["cost"].get("params_reference", r["cost"]["params"])),
    "flops": ("FLOPs/token, dense kernels (share of dense)", lambda r: r["cost"].get("flops_ratio", 1.0)),
    "latency": ("measured prefill latency (share of dense)", lambda r: r["speed"]["prefill_ratio"]),
}


def load_report(path: str | os.PathLike) -> dict:
    p = Path(path)
    p = p / "report.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"no report at {str(p)!r}: give a folder written by `trimformer prune` or a report.json")
    report = json.loads(p.read_text())
    report.setdefault("label", p.parent.name if p.name == "report.json" else p.stem)
    return report


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mean_accuracy(r: dict) -> float | None:
    """A report's mean zero-shot task accuracy (its `tasks` section), or None."""
    return (r.get("tasks") or {}).get("mean")


def frontier(reports: list[dict], x: str = "nonzeros", path: str | os.PathLike = "frontier.png",
             y: str = "kl") -> Path:
    """KL(dense ‖ model) (y='kl') or mean zero-shot task accuracy (y='tasks') against a cost axis, one point per report."""
    if x not in COST_AXES:
        raise ValueError(f"unknown cost axis {x!r}; choose one of {', '.join(COST_AXES)}")
    label, get = COST_AXES[x]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in reports:
        q = r.get("quality", {})
        yv = mean_accuracy(r) if y == "tasks" else q.get("kl", None if "cos_mean" not in q else 1 - q["cos_mean"])
        if yv is None:
            continue
        try:
            xv = get(r)
        except KeyError:
            continue
        ax.scatter([xv], [yv])
        ax.annotate(r["label"], (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(label)
    if y == "tasks":
        ax.set_ylabel("mean zero-shot accuracy (lm-eval)")
    else:
        ax.set_ylabel("KL(dense ‖ model)" if any("kl" in r.get("quality", {}) for r in reports) else "1 − embedding cosine")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def layer_sparsity(report: dict, path: str | os.PathLike = "sparsity.png") -> Path | None:
    """Realised sparsity per projection (from the pruning history), grouped by block."""
    per_layer: dict[str, float] = {}
    for h in report.get("history", []):
        if isinstance(h.get("result"), dict):
            per_layer.update({k: v for k, v in h["result"].items() if isinstance(v, (int, float))})
    if not per_layer:
        return None
    plt = _pyplot()
    names = list(per_layer)
    blocks = [int(m.group(1)) if (m := re.search(r"\.(\d+)\.", n)) else -1 for n in names]
    kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for kind in kinds:
        xs = [b for b, n in zip(blocks, names) if n.endswith("." + kind)]
        ys = [per_layer[n] for n in names if n.endswith("." + kind)]
        ax.plot(xs, ys, marker="o", ms=3, lw=1, label=kind)
    ax.set_xlabel("block")
    ax.set_ylabel("sparsity")
    ax.legend(fontsize=7, ncol=4)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_report(inputs: list[str], out: str | os.PathLike, x: str = "nonzeros", overwrite: bool = False) -> Path:
    """A folder with frontier.png, per-run sparsity plots and index.md (a table of every run)."""
    reports = [load_report(p) for p in inputs]
    with atomic_dir(out, overwrite=overwrite) as tmp:
        frontier(reports, x, tmp / "frontier.png")
        lines = ["# trimformer comparison", "", "![frontier](frontier.png)", ""]
        if any(mean_accuracy(r) is not None for r in reports):
            frontier(reports, x, tmp / "frontier-tasks.png", y="tasks")
            lines += ["![mean task accuracy against cost](frontier-tasks.png)", ""]
        lines += ["| run | ppl | KL | top-1 | mean task acc | params | non-zeros | FLOPs ratio | prefill ratio |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in reports:
            q, c, s = r.get("quality", {}), r.get("cost", {}), r.get("speed", {})

            def f(v, spec="{:.3g}"):
                return "–" if v is None else spec.format(v)

            lines.append(f"| {r['label']} | {f(q.get('ppl'))} | {f(q.get('kl'))} | {f(q.get('top1_agree'), '{:.1%}')} | "
                         f"{f(mean_accuracy(r), '{:.1%}')} | "
                         f"{f(c.get('params'), '{:,}')} | {f(c.get('nonzeros'), '{:,}')} | {f(c.get('flops_ratio'))} | "
                         f"{f(s.get('prefill_ratio'))} |")
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", r["label"])
            if layer_sparsity(r, tmp / f"sparsity-{safe}.png"):
                lines += ["", f"![{r['label']} per-layer sparsity](sparsity-{safe}.png)"]
        (tmp / "index.md").write_text("\n".join(lines) + "\n")
    return Path(out)
