"""Smoke figure for zero-shot tasks: dense bundled models through lm-eval on local data (BENCHMARK.md P5 tasks).

    python benchmarks/tasks_smoke.py --models smollm2-135m,qwen2.5-coder-1.5b --tasks arc_easy,piqa --limit 100

Each (model, task) is its own lm-eval call, timed, so the table also gives seconds per item: what a P5 row costs
on this machine (wall and CPU seconds, with the 1-minute load average around each call: the machine is shared).
Accuracy is deterministic; quote times only from a run under the heavy lock. Writes
benchmarks/results/<out>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from common import environment, out_arg, write_results  # benchmarks/ is on sys.path when run as a script

import trimformer
from trimformer.evaluate.speed import peak_rss_bytes
from trimformer.evaluate.tasks import TaskEval, task_scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--tasks", default="arc_easy,piqa")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    out_arg(ap, "tasks_smoke")
    args = ap.parse_args()

    rows = []
    for name in args.models.split(","):
        t0 = time.perf_counter()
        model, tok = trimformer.load(name, with_tokenizer=True)
        load_s = time.perf_counter() - t0
        for task in args.tasks.split(","):
            t0, c0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
            out = task_scores(model, tok, TaskEval(tasks=[task], limit=args.limit, batch_size=args.batch_size),
                              progress=False)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0  # cpu: user + sys, all threads
            (tname, r), = out["results"].items()
            rows.append({"model": name, "dtype": str(model.dtype).replace("torch.", ""), "task": tname,
                         "metric": r["metric"], "value": r["value"], "stderr": r["stderr"], "n": r["n"],
                         "split": r["split"], "metrics": r["metrics"], "seconds": seconds,
                         "s_per_item": seconds / r["n"], "cpu_s_per_item": cpu / r["n"], "load_s": load_s,
                         "loadavg": [load0, os.getloadavg()[0]], "items": r["items"]})
            print({k: v for k, v in rows[-1].items() if k not in ("items", "metrics")}, flush=True)
        del model
    env = {**environment(), "versions": out["versions"], "peak_rss_bytes": peak_rss_bytes()}
    meta = {"command": "python " + " ".join(sys.argv), "limit": args.limit, "batch_size": args.batch_size,
            "environment": env}
    lines = [f"# Zero-shot task smoke test (lm-eval {out['versions']['lm-eval']}, 0-shot, first {args.limit} items)",
             "", f"`{meta['command']}`", "",
             "| model | dtype | task | metric | value | ± stderr | acc | acc_norm | items | split | s / item | CPU s / item "
             "| load avg |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        m = r["metrics"]
        acc = f"{100 * m['acc'][0]:.1f}" if "acc" in m else "–"
        norm = f"{100 * m['acc_norm'][0]:.1f}" if "acc_norm" in m else "–"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['task']} | {r['metric']} | {100 * r['value']:.1f} | "
                     f"{100 * r['stderr']:.1f} | {acc} | {norm} | {r['n']} | {r['split']} | {r['s_per_item']:.2f} | "
                     f"{r['cpu_s_per_item']:.2f} | {r['loadavg'][0]:.0f}-{r['loadavg'][1]:.0f} |")
    lines += ["", f"torch {env['torch']}, {env['threads']} threads, lm-eval batch {args.batch_size}; "
              f"peak RSS {env['peak_rss_bytes'] / 2**30:.1f} GiB."]
    write_results(args.out, {"meta": meta, "rows": rows}, "\n".join(lines) + "\n", indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
