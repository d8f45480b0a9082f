"""Where cells run: `run_cell` (one cell: `pipeline.run`), and the two ways of running many of them.

Locally each cell is a process of its own, forked from a server that imported trimformer once: a cell that
crashes or is killed (out of memory) fails alone, its peak memory is its own, and it starts in the same state
as every other cell. Under Ray each cell is a task that declares the CPUs, GPUs and memory it needs.
Both call `done(name, result)` as each cell finishes, in the order they finish.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable, Iterable
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from .grid import one_line

Result = dict[str, Any]  # {"report", "meta", "seconds"} or {"error", "traceback", "seconds"}
Runner = Callable[..., Result]
RAY_PIP = "pip install 'trimformer[ray]' (or pip install 'ray>=2.60')"


def run_cell(cell: dict[str, Any], threads: int | None = None, save_to: str | None = None,
             trust_remote_code: bool = False) -> Result:
    """Prune and evaluate one cell (`Cell.spec()` plus its name); errors come back as one line, never raised."""
    t0 = time.perf_counter()
    try:
        import torch

        from .. import __version__
        from ..methods import Recipe
        from ..models.load import set_trust_remote_code
        from ..pipeline import EvalOptions, Job, run
        from ..progress import set_quiet

        set_quiet(True)
        set_trust_remote_code(trust_remote_code)
        if threads:
            torch.set_num_threads(threads)
        recipe = Recipe.from_obj(cell["recipe"])
        ev = cell["evaluation"]
        command = f"trimformer sweep (cell {cell['name']})"
        job = Job(model=cell["model"], recipe=recipe, out=save_to, overwrite=True, command=command,
                  evaluation=None if ev is None else EvalOptions(**ev), **cell["job"])
        result = run(job, say=lambda *a: None)
        meta = {"trimformer": __version__, "model": cell["model"], "command": command, "recipe": recipe.to_list(),
                "history": result.model.trimformer_history}
        return {"report": result.report, "meta": meta, "seconds": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001  (any failure is this cell's result; the others go on)
        return {"error": one_line(e), "traceback": traceback.format_exc(), "seconds": time.perf_counter() - t0}


def _child(runner: Runner, args: tuple, conn) -> None:
    try:
        result = runner(*args)
    except BaseException as e:  # noqa: BLE001  (a runner that raises still answers)
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(), "seconds": 0.0}
    conn.send(result)
    conn.close()


def _context(model_types: Iterable[str] = ()) -> mp.context.BaseContext:
    """forkserver where it exists: the server imports trimformer and the model families' transformers modules
    once (they load lazily, seconds each), each cell is a fresh fork of it. (A server already running keeps
    what it preloaded.)"""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    families = [f"transformers.models.{t}.modeling_{t}" for t in sorted(set(model_types)) if t.isidentifier()]
    ctx.set_forkserver_preload(["trimformer.sweep.execute", "trimformer.pipeline", "transformers.modeling_utils",
                                "transformers.activations", *families])  # (a name that fails to import is skipped)
    return ctx


def model_type(model: str) -> str | None:
    """A local checkpoint's `model_type` (config.json), to preload its modeling code; None when not local."""
    from ..models.load import resolve_local

    path = resolve_local(model)
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") if path else None
    except (OSError, ValueError, AttributeError):
        return None


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        why = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"the cell's process was killed by {name}{why}"
    return f"the cell's process exited with status {code} before reporting"


def run_local(jobs: Iterable[tuple[str, tuple]], workers: int, done: Callable[[str, Result], None],
              runner: Runner = run_cell, model_types: Iterable[str] = ()) -> None:
    """Run `runner(*args)` for each (name, args), `workers` processes at a time (0: in this process)."""
    jobs = list(jobs)
    if workers == 0:
        for name, args in jobs:
            done(name, runner(*args))
        return
    ctx = _context(model_types)
    pending = list(reversed(jobs))
    live: dict[Any, tuple[str, Any, Any, float]] = {}  # sentinel -> (name, process, connection, start)
    try:
        while pending or live:
            while pending and len(live) < workers:
                name, args = pending.pop()
                recv, send = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_child, args=(runner, args, send), name=f"trimformer-cell-{name}")
                p.start()
                send.close()
                live[p.sentinel] = (name, p, recv, time.perf_counter())
            for ready in wait([*live, *(c for _, _, c, _ in live.values())]):
                key = next((s for s, v in live.items() if ready in (s, v[2])), None)
                if key is None:
                    continue
                name, p, conn, t0 = live.pop(key)
                try:
                    result = conn.recv()  # (a result is sent before the process ends)
                except EOFError:
                    p.join()
                    result = {"error": _death(p.exitcode), "traceback": "", "seconds": time.perf_counter() - t0}
                conn.close()
                p.join()
                done(name, result)
    finally:
        for _, p, conn, _ in live.values():  # interrupted: stop our own cells
            p.terminate()
            p.join()
            conn.close()


def run_ray(jobs: Iterable[tuple[str, tuple]], address: str, resources: dict[str, float],
            done: Callable[[str, Result], None], runner: Runner = run_cell) -> str:
    """Each cell a Ray task asking for `resources` (num_cpus, num_gpus, memory); returns where it ran.

    `address`: 'auto' (the cluster RAY_ADDRESS or `ray start` names, else a new one on this machine) or a
    cluster address; a Ray already initialised in this process is used as it is."""
    ray = check_ray(address)
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=None if address == "auto" else address, include_dashboard=False, log_to_driver=False)
        except ConnectionError as e:
            raise ValueError(f"--ray {address}: no Ray cluster there ({one_line(e)}); check the address, or use "
                             "--ray auto (a new cluster on this machine when none runs)") from None
    where = _ray_where(ray)
    refs: dict[Any, str] = {}
    try:
        task = ray.remote(runner).options(max_retries=0, **resources)
        refs.update({task.remote(*args): name for name, args in jobs})
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            name = refs.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001  (the task's worker died, or Ray could not run it)
                result = {"error": f"Ray: {one_line(e)}", "traceback": traceback.format_exc(), "seconds": 0.0}
            done(name, result)
    finally:
        for ref in refs:  # interrupted: cancel the cells not finished
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
    return where


def check_ray(address: str):
    """Ray, imported; and for an address, something listening there (Ray itself waits minutes). Before any work."""
    try:
        import ray
    except ImportError:
        raise ValueError(f"--ray needs Ray, which is not installed: {RAY_PIP}") from None
    if address != "auto" and not ray.is_initialized():
        _check_reachable(address)
    return ray


def _check_reachable(address: str) -> None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # ([::1]:6379)
    if not host or not port.isdigit():
        raise ValueError(f"--ray {address!r}: expected 'auto', HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ValueError(f"--ray {address}: nothing answers there ({e}); start the cluster (`ray start --head`), "
                         "check the address, or use --ray auto") from None


def _ray_where(ray) -> str:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
    gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in nodes)
    return f"Ray cluster: {len(nodes)} node(s), {cpus:g} CPUs, {gpus:g} GPUs"


def default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(workers, 1))
