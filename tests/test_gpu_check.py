"""benchmarks/gpu_check.py without a GPU: it refuses clearly, and its CPU-against-CPU path agrees with itself."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_it_says_so_and_exits_2(gpu_check, capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path / "r")]) == 2
    assert "no CUDA device here" in capsys.readouterr().err and not (tmp_path / "r.md").exists()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_cpu_fallback_compares_a_run_with_itself(gpu_check, method):
    ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    r = gpu_check.compare(lambda where: tiny("llama").to(where), method, torch.device("cpu"), ids[:2], ids[2:],
                          precision="fp32")
    assert r["mask_agree"] == r["mask_agree_worst"] == 1.0 and r["kl_between"] == 0.0
    assert r["kl_cpu"] == r["kl_device"] > 0 and r["kl_relative_difference"] == 0.0
    assert "| llama |" in gpu_check.table([{**r, "model": "llama"}])


def test_a_model_that_is_not_here_is_skipped_with_the_reason(gpu_check, tmp_path, capsys, monkeypatch):
    # absent by construction: on a machine where `trimformer fetch` installed it, the check would prune the real
    # 1.5B model here
    from trimformer.models import load

    def missing(name):
        raise load.ModelNotFoundError(f"{name} is not installed: trimformer fetch {name}")

    monkeypatch.setattr(load, "bundled_path", missing)
    assert gpu_check.main(["--device", "cpu", "--models", "qwen2.5-coder-1.5b", "--out", str(tmp_path / "r")]) == 0
    assert "skipped: qwen2.5-coder-1.5b is not installed" in (tmp_path / "r.md").read_text()
    assert "skipped" in capsys.readouterr().err
