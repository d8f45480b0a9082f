"""Teacher targets cached on disk: the same loss as on the fly, computed once, refused for other data."""

from __future__ import annotations

import copy

import pytest
from conftest import tiny
from test_recover import losses, windows

from trimformer.recover import RecoverConfig, recover_


@pytest.mark.parametrize("loss, chunk", [("kl+hidden", 128), ("kl+lm", 0)])
def test_cached_teacher_gives_the_same_losses_and_is_computed_once(tmp_path, loss, chunk):
    teacher = tiny("llama", seed=1)
    a = tiny("llama")
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    data = windows(6, 16)
    cfg = dict(steps=5, batch_size=2, lr=1e-3, loss=loss, loss_chunk=chunk)  # 5 x 2 > 6 windows: a second epoch
    recover_(a, teacher, data, RecoverConfig(**cfg), progress=False)
    path = tmp_path / "teacher.safetensors"
    recover_(b, teacher, data, RecoverConfig(**cfg, teacher_cache=str(path)), progress=False)
    assert losses(b) == pytest.approx(losses(a), rel=1e-5, abs=1e-7)
    assert path.is_file() and not list(tmp_path.glob(".*tmp*"))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    width = 64 if chunk else 259  # last hidden states when the head loss is fused, else full logits
    assert shapes["out"] == (6, 16, width)
    assert ("block.1" in shapes) == ("hidden" in loss)

    def never(module, args):
        raise AssertionError("the teacher ran although its targets are cached")

    handles = [blk.register_forward_pre_hook(never) for blk in teacher.model.layers]
    recover_(c, teacher, data, RecoverConfig(**cfg, teacher_cache=str(path)), progress=False)
    assert losses(c) == losses(b)
    with pytest.raises(ValueError, match="other data"):
        recover_(copy.deepcopy(a), teacher, windows(6, 16, seed=9), RecoverConfig(**cfg, teacher_cache=str(path)),
                 progress=False)
    for h in handles:
        h.remove()


def test_time_limit_stops_training_and_bad_settings_are_refused():
    teacher = tiny("llama", seed=1)
    student = tiny("llama")
    recover_(student, teacher, windows(), RecoverConfig(steps=10_000, batch_size=2, max_minutes=0.02), progress=False)
    r = student.trimformer_history[-1]["result"]
    assert 0 < r["steps_run"] < 10_000 and "time limit" in r["stopped"]
    with pytest.raises(ValueError, match="max_minutes"):
        RecoverConfig(max_minutes=0)
    with pytest.raises(ValueError, match="safetensors"):
        RecoverConfig(teacher_cache="teacher.pt")
