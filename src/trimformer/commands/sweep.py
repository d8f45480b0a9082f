"""`trimformer sweep grid.yaml`: every cell of a grid of recipes pruned and evaluated, one frontier report."""

from __future__ import annotations

import argparse
import sys

GRID_EXAMPLE = """grid.yaml:
  model: smollm2-135m
  recipe: [{method: wanda, sparsity: 0.5}]
  axes: {method: [wanda, sparsegpt], sparsity: [0.3, 0.5, 0.7]}
  job: {calib_windows: 64}
  evaluation: {windows: 64, kl_windows: 16, measure_speed: false}
  run: {workers: 2}
"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="prune + evaluate every cell of a grid of recipes (local processes or Ray), one frontier report",
        description="Runs each cell of the grid (the cross product of its axes over a base recipe) as `trimformer "
        "prune` would, gathers the reports into OUT/report/ (frontier plot) and OUT/summary.md/.json. A failed cell "
        "is reported with its error and the others finish; running the same command again skips finished cells.",
        epilog=GRID_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("grid", help="the grid: a YAML/JSON file with model, recipe, axes (and job, evaluation, run)")
    p.add_argument("--out", help="the sweep folder (default: the grid's `out`, else GRID-sweep/)")
    p.add_argument("--workers", type=int, help="cells at a time in local processes (0: in this process); run.workers")
    p.add_argument("--cpus", type=int, help="threads per cell; under Ray the CPUs each task asks for (run.cpus)")
    p.add_argument("--gpus", type=float, help="GPUs each Ray task asks for (run.gpus)")
    p.add_argument("--memory-gb", type=float, help="memory each Ray task asks for (run.memory_gb)")
    p.add_argument("--save-models", action="store_true", default=None, help="keep each cell's checkpoint in OUT/models/")
    p.add_argument("--x", choices=["nonzeros", "params", "flops", "latency"], help="cost axis of the frontier (run.x)")
    p.add_argument("--ray", metavar="auto|ADDRESS", help="run each cell as a Ray task: 'auto' (the cluster RAY_ADDRESS "
                   "or `ray start` names, else a new one on this machine) or a cluster address "
                   "(needs pip install 'trimformer[ray]')")
    p.add_argument("--dry-run", action="store_true", help="list the cells and what would run; run nothing")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..sweep import Grid, run
    from ..sweep.driver import folder, plan, summary_markdown

    grid = Grid.from_file(args.grid).with_run(workers=args.workers, cpus=args.cpus, gpus=args.gpus,
                                              memory_gb=args.memory_gb, save_models=args.save_models, x=args.x)
    if args.ray is not None and not args.ray.strip():
        raise ValueError("--ray needs 'auto' or a cluster address, e.g. --ray auto")
    if args.dry_run:
        out = folder(grid, args.out)
        for c, status in plan(grid, out):
            steps = " -> ".join(", ".join(f"{k}={v}" for k, v in s.items()) for s in c.recipe)
            job = "".join(f", {k}={v}" for k, v in c.job.items())
            print(f"{status:>8}  {c.name}: " + (c.error if c.error else f"{steps} (model={c.model}{job})"))
        print(f"(into {out}/; nothing was run)")
        return 0
    try:
        summary = run(grid, args.out, ray=args.ray, trust_remote_code=getattr(args, "trust_remote_code", False))
    except KeyboardInterrupt:
        print("interrupted: finished cells are kept; run the same command again to continue", file=sys.stderr)
        return 130
    print(summary_markdown(summary))
    failed = summary["counts"]["failed"]
    if failed:
        print(f"trimformer: error: {failed} of {len(summary['cells'])} cells failed (errors above and in the summary); "
              "fix them and run the same command again: finished cells are skipped", file=sys.stderr)
        return 2
    return 0
