"""Data-parallel calibration (parallel.py): `torchrun --nproc-per-node 2 -m trimformer prune` on CPU (gloo) gives
the checkpoint one process gives; steps that cannot share their statistics are refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from trimformer import parallel, pipeline
from trimformer.methods import Recipe
from trimformer.models.load import load
from trimformer.steps import check_supported

RECIPE = """steps:
  - {method: owl, base: wanda, sparsity: 0.4, targets: attn, settings: {precision: fp32}}
  - {method: sparsegpt, sparsity: 0.5, targets: mlp, precision: fp32}
"""


def test_two_gloo_processes_prune_like_one(saved_llama, tmp_path):
    """OWL (outlier counts, block by block), Wanda norms and SparseGPT Hessians each summed over 2 processes with
    2 windows each: the same masks as 1 process with all 4 windows, weights equal to fp32 rounding (Wanda's
    untouched weights exactly)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    common = ["prune", "--model", str(saved_llama), "--recipe", str(recipe), "--calib-windows", "4",
              "--calib-length", "32", "--no-eval", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRIMFORMER_QUIET": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "trimformer", "-q", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    job = pipeline.Job(model=str(saved_llama), recipe=Recipe.from_file(recipe), out=str(tmp_path / "one"),
                       calib_windows=4, calib_length=32, evaluation=None, device="cpu", offload="none")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process: a GEMM's own summation order follows its thread count
    try:
        one = pipeline.run(job, say=lambda *_: None).model.state_dict()
    finally:
        torch.set_num_threads(threads)
    both = load(tmp_path / "two").state_dict()
    assert one.keys() == both.keys()
    zeros = 0
    for k in one:
        assert torch.equal(one[k] == 0, both[k] == 0), f"mask of {k} differs"
        # Hessians summed in another order (per process, then across): OBS updates differ by ~3e-6 of ~0.1 weights
        torch.testing.assert_close(one[k], both[k], rtol=1e-4, atol=1e-5, msg=k)
        zeros += int(one[k].eq(0).sum()) if "proj" in k else 0
    assert zeros > 0
    assert '"processes": 2' in (tmp_path / "two" / "trimformer.json").read_text()


def test_one_process_functions_are_no_ops():
    t = torch.ones(3)
    parallel.all_reduce_(t, None)
    assert torch.equal(t, torch.ones(3)) and parallel.reduce_sum({"a": 2, "b": [1.5]}) == {"a": 2, "b": [1.5]}
    assert parallel.share(5) == slice(0, 5) and parallel.size() == 1 and parallel.is_main()


def test_steps_that_cannot_share_statistics_are_refused():
    width = Recipe.one("width", target="params=0.8").build()
    with pytest.raises(ValueError, match="'width' does not calibrate data-parallel yet.*without torchrun"):
        check_supported(width, processes=2)
    with pytest.raises(ValueError, match="'width' does not run on a model streamed from disk.*--offload none"):
        check_supported(width, streamed=True)
    check_supported(Recipe.one("sparsegpt").build(), streamed=True, processes=2)  # weight methods do both


def test_too_few_windows_for_the_processes(monkeypatch):
    monkeypatch.setattr(parallel, "size", lambda: 4)
    monkeypatch.setattr(parallel, "rank", lambda: 3)
    assert parallel.share(10) == slice(7, 10)
    with pytest.raises(ValueError, match="3 calibration window.*4 processes.*--calib-windows 4"):
        parallel.share(3)
