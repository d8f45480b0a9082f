"""Calibration windows: deterministic, from every kind of source, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from trimformer import data


def test_windows_are_the_first_non_overlapping_ones():
    ids = torch.arange(100)
    w = data.windows(ids, 3, 10)
    assert w.shape == (3, 10) and w[1, 0].item() == 10 and w[2, -1].item() == 29


def test_too_short_text_says_how_many_windows_fit():
    with pytest.raises(data.DataError, match=r"fewer than the 5 x 30.*at most 3"):
        data.windows(torch.arange(100), 5, 30, what="calibration data")


def test_doc_pools_split_the_corpus_in_halves(tokenizer):
    calib, ev = data.doc_pools(tokenizer)
    full = data.tokenize(tokenizer, data.doc_corpus())
    assert torch.equal(torch.cat([calib, ev]), full)
    assert abs(calib.numel() - ev.numel()) <= 1
    assert torch.equal(data.calibration_windows(tokenizer, n=2, length=64)[0], calib[:64])
    assert torch.equal(data.evaluation_windows(tokenizer, n=2, length=64)[1], ev[64:128])


def test_text_file_folder_and_jsonl(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("alpha " * 50)
    (tmp_path / "b.md").write_text("beta " * 50)
    rows = [{"text": "gamma " * 20, "id": 1}, {"text": "delta " * 20, "id": 2}]
    jl = tmp_path / "sub" / "c.jsonl"
    jl.parent.mkdir()
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    assert data.read_text(tmp_path / "a.txt").startswith("alpha")
    folder = data.read_text(tmp_path)
    assert "alpha" in folder and "beta" in folder and "gamma" in folder
    assert data.read_text(jl).startswith("gamma")
    w = data.calibration_windows(tokenizer, str(tmp_path / "a.txt"), n=2, length=16)
    assert w.shape == (2, 16)
    with pytest.raises(data.DataError, match="no field 'body'"):
        data.read_text(jl, field="body")


def test_missing_source_is_a_clear_error():
    with pytest.raises(data.DataError, match="neither 'docs', a file nor a folder"):
        data.read_text("/nonexistent/calib.txt")
