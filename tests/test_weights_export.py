"""compressed-tensors sparse export: exact round trip (identical logits), format choice, atomic writes, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny
from safetensors.torch import load_file

import trimformer
from trimformer.cli import main
from trimformer.export.compressed import compress, decompress, load_compressed, save_compressed
from trimformer.export.hf import save_pretrained
from trimformer.weights import WEIGHTS


@pytest.mark.parametrize("fmt", ["sparse-bitmask", "sparse-24-bitmask"])
def test_compress_round_trip_is_exact(fmt):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 16, generator=g)
    if fmt == "sparse-24-bitmask":
        W = W * WEIGHTS.build("magnitude", {"pattern": "2:4"}).mask(W, None, 0.5)
        W[0, :4] = 0  # a group with fewer than 2 non-zeros still fits the 2:4 layout
    else:
        W[W.abs() < 0.7] = 0
    parts = compress(W, fmt)
    assert torch.equal(decompress(parts, fmt), W)
    if fmt == "sparse-24-bitmask":
        assert parts["compressed"].shape == (6, 8)
    else:
        assert parts["compressed"].numel() == W.count_nonzero()
        assert parts["row_offsets"][1] == (W[0] != 0).sum()


@pytest.mark.parametrize("family, pattern", [("llama", "unstructured"), ("llama", "2:4"), ("opt", "unstructured")])
def test_checkpoint_round_trip_gives_identical_logits(tmp_path, family, pattern, calib, ids):
    model = tiny(family)
    trimformer.prune_(model, WEIGHTS.build("wanda", {"pattern": pattern}), calibration=calib, progress=False)
    out = save_compressed(model, tmp_path / "ct")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    expected = "sparse-24-bitmask" if pattern == "2:4" else "sparse-bitmask"
    assert cfg["quant_method"] == "compressed-tensors" and cfg["sparsity_config"]["format"] == expected
    assert cfg["sparsity_config"]["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    keys = load_file(out / "model.safetensors")
    # compressed-tensors' key layout: <module>.bitmask / .compressed / .shape, no dense <module>.weight left
    assert any(k.endswith("layers.0.self_attn.q_proj.bitmask") for k in keys)
    assert not any(k.endswith("q_proj.weight") or ".weight." in k for k in keys)
    shape = next(v for k, v in keys.items() if k.endswith(".shape"))
    assert shape.dtype == torch.int64 and shape.shape == ((2, 1) if pattern == "2:4" else (2,))
    back = load_compressed(out)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)


def test_24_format_refuses_a_model_that_is_not_24(tmp_path, calib):
    model = tiny("llama")
    trimformer.prune_(model, WEIGHTS.build("wanda", {"sparsity": 0.5}), calibration=calib, progress=False)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        save_compressed(model, tmp_path / "x", fmt="sparse-24-bitmask")
    assert not (tmp_path / "x").exists() and not list(tmp_path.iterdir())  # nothing half-written


def test_cli_export(tmp_path, calib, ids, capsys):
    model = tiny("llama")
    trimformer.prune_(model, WEIGHTS.build("magnitude", {"pattern": "2:4"}), progress=False)
    src = tmp_path / "pruned"
    save_pretrained(model, src)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast  # a tokenizer so the CLI can copy one

    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))).save_pretrained(src)
    assert main(["--quiet", "export", str(src), "--format", "compressed-tensors"]) == 0
    out = tmp_path / "pruned-compressed-tensors"
    assert "sparse-24-bitmask" in (out / "config.json").read_text()
    with torch.no_grad():
        assert torch.equal(load_compressed(out)(input_ids=ids).logits, model(input_ids=ids).logits)
    assert main(["--quiet", "export", str(src)]) == 2  # exists: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
