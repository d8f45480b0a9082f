"""Export of structurally pruned models: plain when uniform, auto_map modeling file when not; identical logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ALL_FAMILIES, tiny

import trimformer
from trimformer.export import structured as export
from trimformer.models import anatomy_of, modeling_file
from trimformer.structure import channels, surgery


def _out(model, ids):
    if model.config.model_type == "vit":
        return model(pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))).logits
    o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _uniform_cut(model):
    an = anatomy_of(model)
    for b in an.blocks:
        surgery.prune_neurons(b, range(0, b.mlp.intermediate_size, 2))
    return model


def _hetero_cut(model):
    an = anatomy_of(model)
    b0, b1 = an.blocks
    surgery.prune_neurons(b0, range(0, 40))
    a = b1.attention
    group = a.num_heads // a.num_kv_heads
    keep = [h for h in range(a.num_heads) if h % group != 0] if group > 1 else [0, 2, 3]
    surgery.prune_heads(b1, keep)
    if b0.pre_norm:
        surgery.remove_attention(an, b0)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3", "bert"])
@torch.no_grad()
def test_uniform_cut_saves_plain_checkpoint(family, ids, tmp_path):
    model = _uniform_cut(tiny(family))
    want = _out(model, ids)
    export.save(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "auto_map" not in cfg and not (tmp_path / "m" / modeling_file.MODELING_FILE).exists()
    assert cfg.get("intermediate_size", cfg.get("ffn_dim")) == 64
    back = trimformer.load(tmp_path / "m")
    torch.testing.assert_close(_out(back, ids), want)


@pytest.mark.parametrize("family", ALL_FAMILIES)
@torch.no_grad()
def test_heterogeneous_cut_round_trips(family, ids, tmp_path):
    model = _hetero_cut(tiny(family))
    want = _out(model, ids)
    export.save(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "auto_map" in cfg and (tmp_path / "m" / modeling_file.MODELING_FILE).is_file()
    back = trimformer.load(tmp_path / "m")
    torch.testing.assert_close(_out(back, ids), want)
    an = anatomy_of(back)  # the reloaded model has an anatomy with the pruned shapes
    assert an.blocks[0].mlp.intermediate_size == 40
    assert an.blocks[1].attention.num_heads < tiny(family).config.num_attention_heads


_VANILLA = """
import sys, torch, transformers
cls = getattr(transformers, sys.argv[2])
m = cls.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.load(sys.argv[3])
with torch.no_grad():
    torch.save(m(input_ids=ids).logits, sys.argv[4])
assert not any(k.startswith("trimformer") for k in sys.modules), "trimformer was imported"
m.generate(ids[:1, :5], max_new_tokens=3, do_sample=False, pad_token_id=0)
"""


def _assert_vanilla_reload(model, ids, tmp_path) -> None:
    """Save `model`, reload it in a process with no trimformer on the path; the logits must be identical."""
    want = model(input_ids=ids).logits
    export.save(model, tmp_path / "m")
    torch.save(ids, tmp_path / "ids.pt")
    env = {"PYTHONPATH": "", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", _VANILLA, str(tmp_path / "m"), "AutoModelForCausalLM",
                    str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")], check=True, env=env, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), want)


@torch.no_grad()
def test_heterogeneous_reloads_with_vanilla_transformers_only(ids, tmp_path):
    model = _hetero_cut(tiny("llama"))
    channels.prune_channels(anatomy_of(model), range(60))  # hidden 64 -> 60 as well
    _assert_vanilla_reload(model, ids, tmp_path)


@torch.no_grad()
def test_searched_architecture_reloads_with_vanilla_transformers_only(calib, ids, tmp_path):
    """search output: per-block FFN widths, attention removed in some blocks, a block removed."""
    from test_structure_surgery import _deeper

    model = _deeper(tiny("llama"), 4)
    an = anatomy_of(model)
    an.blocks[1].attention.o.weight.zero_()
    an.blocks[1].mlp.down.weight.zero_()  # an identity block: the search drops it
    an.blocks[3].attention.o.weight.zero_()  # a dead attention: the search removes it
    trimformer.prune_(model, trimformer.build("search", {"target": "params=0.75", "widths": "0.5,0",
                                                          "multiple_of": 1, "precision": "fp32"}),
                      calibration=calib, progress=False)
    choices = model.trimformer_history[-1]["result"]["choices"]
    assert choices[1] == "removed" and choices[3].startswith("no-attn")
    _assert_vanilla_reload(model, ids, tmp_path)
