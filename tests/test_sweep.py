"""`trimformer sweep`: a grid of recipes on a tiny local checkpoint, in local processes and under Ray."""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest
import yaml

from trimformer.cli import main
from trimformer.sweep import Grid, frontier, run

FAST = {"job": {"calib_windows": 2, "calib_length": 32},
        "evaluation": {"windows": 2, "kl_windows": 1, "length": 32, "measure_speed": False}}


def grid_file(tmp_path, model, axes, **extra) -> str:
    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump({"model": str(model), "recipe": [{"method": "magnitude", "sparsity": 0.5}],
                                 "axes": axes, **FAST, **extra}))
    return str(p)


def test_cells_are_the_cross_product_with_each_setting_where_it_belongs():
    g = Grid.from_obj({"model": "m", "recipe": [{"method": "wanda", "sparsity": 0.5}], "axes": {
        "method": ["wanda", "sparsegpt"],
        "allocation": [None, "owl"],
        "x": [{"sparsity": 0.7, "calib_windows": 8}, {"name": "n:m", "pattern": "2:4"}]}})
    cells = g.cells()
    assert len(cells) == 8
    assert cells[0].name == "method=wanda,allocation=none,x=sparsity=0.7+calib_windows=8"
    assert cells[0].recipe == [{"method": "wanda", "sparsity": 0.7}] and cells[0].job == {"calib_windows": 8}
    assert cells[6].recipe == [{"method": "sparsegpt", "sparsity": 0.7, "allocation": "owl"}]
    assert cells[6].axes == {"method": "sparsegpt", "allocation": "owl", "x": "sparsity=0.7+calib_windows=8"}
    assert cells[5].name == "method=sparsegpt,allocation=none,x=n_m"  # ':' is not kept in a folder name
    assert cells[5].recipe == [{"method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"}]
    # an N:M pattern fixes each layer's share: no allocation can spread it (found before any work)
    assert [c.name for c in cells if c.error] == ["method=wanda,allocation=owl,x=n_m", "method=sparsegpt,allocation=owl,x=n_m"]
    assert "allocation spreads an unstructured budget" in cells[3].error


def test_a_cell_that_is_not_a_valid_recipe_is_marked_and_the_others_are_kept():
    g = Grid.from_obj({"model": "m", "axes": {"method": ["wanda", "width"], "sparsity": [0.5]}})
    ok, bad = g.cells()
    assert ok.error is None
    assert "width has no setting 'sparsity'" in bad.error  # found before any work


@pytest.mark.parametrize("obj,match", [
    ({"model": "m", "recipe": [{"method": "wanda"}], "axis": {}}, "unknown grid key 'axis'. Did you mean 'axes'"),
    ({"model": "m", "recipe": [{"method": "wanda"}], "axes": {"sparsity": 0.5}}, "expected a non-empty list"),
    ({"recipe": [{"method": "wanda"}]}, "no model"),
    ({"model": "m", "axes": {"sparsity": [0.5]}}, "no recipe"),
    ({"model": "m", "recipe": [{"method": "wanda"}], "run": {"wrokers": 2}}, "Did you mean 'workers'"),
    ({"model": "m", "recipe": [{"method": "wanda"}], "job": {"calib_windowz": 2}}, "Did you mean 'calib_windows'"),
    ({"model": "m", "recipe": [{"method": "wanda"}], "evaluation": False}, "run.save_models: true"),
    ({"model": "m", "recipe": [{"method": "wanda"}], "axes": {"sparsity": [1.5, 2]}}, "no cell of the grid is valid"),
    ({"model": "m", "recipe": [{"method": "wanda"}, {"method": "magnitude"}], "axes": {"method": ["wanda"]}},
     "no cell of the grid is valid"),
])
def test_grid_errors_name_the_problem(obj, match):
    with pytest.raises(ValueError, match=match):
        Grid.from_obj(obj)


def test_frontier_keeps_the_cells_nothing_beats():
    rows = [{"name": n, "cost": c, "loss": lo} for n, c, lo in
            [("a", 0.5, 0.3), ("b", 0.5, 0.2), ("c", 0.7, 0.1), ("d", 0.8, 0.1), ("e", 0.4, None)]]
    assert frontier(rows) == {"b", "c"}


def test_a_grid_runs_in_processes_a_bad_cell_fails_alone_and_a_rerun_skips_what_is_done(saved_llama, tmp_path, capsys):
    """2 methods x 3 settings, 2 processes at a time; wanda needs calibration windows longer than the model's
    positions in one setting, so that cell fails at run time, alone (magnitude does not calibrate)."""
    bad = {"name": "bad", "sparsity": 0.5, "calib_length": 4096}
    axes = {"method": ["magnitude", "wanda"], "setting": [{"sparsity": 0.25}, {"sparsity": 0.5}, bad]}
    grid, out = grid_file(tmp_path, saved_llama, axes, run={"workers": 2}), tmp_path / "sweep"
    before = (saved_llama / "model.safetensors").read_bytes()
    assert main(["-q", "sweep", grid, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "wanda,setting=bad: failed: --calib-length 4096 is longer than the model's 256 positions" in err
    assert err.strip().splitlines()[-1].startswith("trimformer: error: 1 of 6 cells failed")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"done": 5, "skipped": 0, "failed": 1, "not run": 0}
    rows = {r["name"]: r for r in summary["cells"]}
    for r in rows.values():
        if r["status"] == "done":  # each cell is what `trimformer prune` writes
            report = json.loads((out / "cells" / r["name"] / "report.json").read_text())
            sparsity = 0.25 if "0.25" in r["name"] else 0.5
            assert report["cost"]["sparsity_prunable"] == pytest.approx(sparsity, abs=1e-3)
            assert r["kl"] == report["quality"]["kl"] > 0
            meta = json.loads((out / "cells" / r["name"] / "trimformer.json").read_text())
            assert meta["recipe"][0]["method"] == r["axes"]["method"]
    same = rows["method=magnitude,setting=bad"], rows["method=magnitude,setting=sparsity=0.5"]
    assert same[0]["kl"] == same[1]["kl"]  # the same cut in two processes: the same numbers
    assert {n for n, r in rows.items() if r.get("frontier")} == frontier([r for r in rows.values() if r["status"] == "done"])
    assert (out / "report" / "frontier.png").stat().st_size > 0
    assert "method=wanda,setting=sparsity=0.25" in (out / "report" / "index.md").read_text()
    assert "| wanda | bad | failed |" in (out / "summary.md").read_text()
    assert (saved_llama / "model.safetensors").read_bytes() == before  # the input is never touched
    assert not [p for p in out.rglob("*") if "trimformer-tmp" in p.name]

    assert main(["sweep", grid, "--out", str(out), "--dry-run"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed[:6]] == ["finished"] * 5 + ["run"]

    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").rglob("*.json")}
    assert main(["-q", "sweep", grid, "--out", str(out)]) == 2  # the same grid again: only the failed cell runs
    assert "6 cells, 1 to run, 5 finished earlier (skipped)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    axes["setting"][2] = {"name": "bad", "sparsity": 0.5}  # fixed: same names, new settings for both its cells
    grid = grid_file(tmp_path, saved_llama, axes, run={"workers": 2})
    assert main(["-q", "sweep", grid, "--out", str(out), "--workers", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"done": 2, "skipped": 4, "failed": 0, "not run": 0}


def crash_or_echo(cell: dict, threads, save_to, trust_remote_code) -> dict:
    """A cell runner for the test below (module level: forked cells import it)."""
    if "crash" in cell["name"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return {"report": None, "meta": {"threads": threads}, "seconds": 0.0}


def test_a_cell_whose_process_dies_fails_alone(tmp_path):
    g = Grid.from_obj({"model": "m", "recipe": [{"method": "magnitude"}], "evaluation": False,
                       "axes": {"sparsity": [0.1, {"name": "crash", "sparsity": 0.2}, 0.3]},
                       "run": {"workers": 2, "save_models": True}})
    summary = run(g, tmp_path / "s", runner=crash_or_echo, say=lambda *a: None)
    status = {r["name"]: (r["status"], r["error"]) for r in summary["cells"]}
    assert status["sparsity=crash"] == ("failed", "the cell's process was killed by SIGKILL (out of memory?)")
    assert status["sparsity=0.1"] == status["sparsity=0.3"] == ("done", None)


def test_ray_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    g = Grid.from_obj({"model": "m", "recipe": [{"method": "magnitude"}], "axes": {"sparsity": [0.1]}, **FAST})
    with pytest.raises(ValueError, match=r"--ray needs Ray, which is not installed: pip install 'trimformer\[ray\]'"):
        run(g, tmp_path / "s", ray="auto", say=lambda *a: None)


def test_cells_run_as_ray_tasks(saved_llama, tmp_path):
    ray = pytest.importorskip("ray")
    axes = {"setting": [{"method": "magnitude", "sparsity": 0.5},
                        {"name": "bad", "method": "wanda", "sparsity": 0.5, "calib_length": 4096}]}
    g = Grid.from_file(grid_file(tmp_path, saved_llama, axes, run={"cpus": 1}))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # (a new cluster, always)
    try:
        summary = run(g, tmp_path / "s", ray="auto", say=lambda *a: None)
    finally:
        ray.shutdown()
    assert summary["ran_on"].startswith("Ray cluster: 1 node(s), 2 CPUs")
    rows = {r["name"]: r for r in summary["cells"]}
    assert rows["setting=bad"]["status"] == "failed" and "--calib-length 4096" in rows["setting=bad"]["error"]
    done = rows["setting=method=magnitude+sparsity=0.5"]
    assert done["status"] == "done" and done["kl"] > 0
    report = json.loads((tmp_path / "s" / "cells" / done["name"] / "report.json").read_text())
    assert report["environment"]["threads"] == 1  # the task's declared CPUs


def test_a_ray_address_where_nothing_listens_is_refused_before_any_work(tmp_path):
    pytest.importorskip("ray")
    g = Grid.from_obj({"model": "m", "recipe": [{"method": "magnitude"}], "axes": {"sparsity": [0.1]}, **FAST})
    with pytest.raises(ValueError, match="--ray 127.0.0.1:1: nothing answers there"):
        run(g, tmp_path / "s", ray="127.0.0.1:1", say=lambda *a: None)
    assert not (tmp_path / "s").exists()


def test_the_readme_grid_is_valid():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"^```yaml\n(.*?)^```", readme, flags=re.S | re.M) if b.startswith("# grid.yaml")]
    assert blocks
    cells = Grid.from_obj(yaml.safe_load(blocks[0])).cells()
    assert len(cells) == 6 and not any(c.error for c in cells)
