"""Export: vanilla transformers reloads the pruned model with identical logits; writes are atomic."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import tiny

import trimformer
from trimformer.export import OutputExistsError, save_pretrained


def _out(model, ids):
    with torch.no_grad():
        o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "opt", "bert"])
def test_export_then_vanilla_reload_gives_identical_logits(family, tmp_path, calib, ids):
    model = tiny(family)
    trimformer.prune_(model, trimformer.build("wanda", {"sparsity": 0.5}), calibration=calib, progress=False)
    save_pretrained(model, tmp_path / "out", extra_files={"report.json": {"ok": 1}})
    cls = T.AutoModel if family == "bert" else T.AutoModelForCausalLM
    back = cls.from_pretrained(tmp_path / "out").eval()  # plain transformers, no trimformer code
    assert torch.equal(_out(model, ids), _out(back, ids))
    assert (tmp_path / "out" / "report.json").is_file()
    if family == "llama":  # tied embeddings stay tied
        assert back.lm_head.weight is back.model.embed_tokens.weight


def test_existing_output_is_refused_and_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_pretrained(tiny("llama"), out)
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny("llama")

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    save_pretrained(tiny("llama"), out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
