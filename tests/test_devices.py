"""Any dtype, any device: every method family runs end to end on a bfloat16 model (on the CPU here); devices and
dtypes are checked with clear errors; the pipeline writes the checkpoint in the dtype it pruned in."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, tiny

import trimformer
from trimformer import kv, tokens
from trimformer.models.load import load, parse_dtype, resolve_device
from trimformer.recover import RecoverConfig, recover_

BF16 = torch.bfloat16


def calib(n: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))  # (n, T)


def bf16(family: str):
    return tiny(family).to(BF16)


def assert_all_bf16(model) -> None:
    assert {p.dtype for p in model.parameters()} == {BF16}


def finite_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    y = out.logits if hasattr(out, "logits") else out.last_hidden_state
    assert torch.isfinite(y).all()
    return y


@pytest.mark.parametrize("method,agree", [("magnitude", 0.99), ("wanda", 0.95), ("sparsegpt", 0.8)])
def test_weight_methods_on_bfloat16_match_float32_masks(method, agree):
    """A bf16 model prunes to the requested sparsity, stays bf16, and keeps most of the fp32 run's masks: the
    scores see the same weights up to bf16 rounding (SparseGPT's updates, rounded to bf16, drift more)."""
    ref, m = tiny("llama"), bf16("llama")
    for model in (ref, m):
        trimformer.prune_(model, trimformer.build(method, {"sparsity": 0.5}), calibration=calib(), progress=False)
    assert_all_bf16(m)
    a, b = trimformer.anatomy_of(ref), trimformer.anatomy_of(m)
    for (name, p), (_, q) in zip(a.projections(), b.projections()):
        assert q.weight.eq(0).float().mean().item() == pytest.approx(0.5, abs=0.01), name
        assert (p.weight.eq(0) == q.weight.eq(0)).float().mean() > agree, name
    finite_logits(m, calib(1))


@pytest.mark.parametrize("settings", [{"method": "width", "target": "params=0.8"}, {"method": "depth", "remove": 1}])
def test_structure_methods_on_bfloat16(settings):
    m = bf16("llama")
    before = sum(p.numel() for p in m.parameters())
    s = dict(settings)
    trimformer.prune_(m, trimformer.build(s.pop("method"), s), calibration=calib(), progress=False)
    assert sum(p.numel() for p in m.parameters()) < before
    assert_all_bf16(m)
    finite_logits(m, calib(1))


def test_token_pruning_on_bfloat16():
    m = bf16("bert")
    ids = calib(2, 24)
    dense = finite_logits(m, ids)
    with tokens.prune(m, "merge", keep=0.5, recover=len(m.encoder.layer)) as s:
        out = finite_logits(m, ids)
    assert out.dtype == BF16 and out.shape == dense.shape and max(s.counts[-1]) < ids.shape[1]


def test_kv_press_on_bfloat16():
    m = bf16("llama")
    ids = calib(1, 24)
    with torch.no_grad(), kv.press(m, "snapkv", 0.5, window=4, kernel=3) as s:
        cache = s.prefill(ids[:, :20])
        out = m(ids[:, 20:], cache=cache).logits
    assert out.dtype == BF16 and torch.isfinite(out).all()


def test_recover_on_bfloat16_keeps_masks_and_dtype():
    teacher = bf16("llama")
    student = copy.deepcopy(teacher)
    trimformer.prune_(student, trimformer.build("wanda", {}), calibration=calib(), progress=False)
    zeros = {n: p.detach() == 0 for n, p in student.named_parameters() if "proj" in n}
    recover_(student, teacher, calib(8, 16), RecoverConfig(steps=2, batch_size=2, warmup_steps=0), progress=False)
    assert_all_bf16(student)
    assert all(bool((p.detach()[zeros[n]] == 0).all()) for n, p in student.named_parameters() if n in zeros)
    assert all(torch.isfinite(torch.tensor(v)) for v in student.trimformer_history[-1]["result"]["losses"])


def test_pipeline_writes_the_dtype_it_pruned_in(saved_llama, tmp_path):
    from safetensors import safe_open

    from trimformer import pipeline
    from trimformer.methods import Recipe

    job = pipeline.Job(model=str(saved_llama), recipe=Recipe.one("wanda"), out=str(tmp_path / "out"), calib_windows=2,
                       calib_length=16, evaluation=None, device="cpu", dtype="bfloat16", offload="none")
    pipeline.run(job, say=lambda *_: None)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert_all_bf16(load(tmp_path / "out", dtype="bfloat16"))


def test_dtypes_and_devices_are_checked():
    assert parse_dtype("bfloat16") is BF16 and parse_dtype("float16") is torch.float16 and parse_dtype(BF16) is BF16
    with pytest.raises(ValueError, match="--dtype int8: choose float32, bfloat16 or float16"):
        parse_dtype("int8")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device tpu: choose cpu, cuda, cuda:N or auto"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: this machine has no CUDA GPU.*--device cpu"):
            resolve_device("cuda")


def test_cli_rejects_a_bad_dtype_or_device_in_one_line(saved_llama, tmp_path, capsys):
    from trimformer.cli import main

    with pytest.raises(SystemExit) as e:
        main(["prune", "--model", str(saved_llama), "--method", "wanda", "--dtype", "int8", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "--dtype" in capsys.readouterr().err
    code = main(["prune", "--model", str(saved_llama), "--method", "wanda", "--device", "tpu", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("trimformer: error: --device tpu") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
