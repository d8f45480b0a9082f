"""DeciLM export: every key explicit, the shapes vLLM's rules build from the config equal the tensors, the model
read back by those rules gives our logits; what the format cannot hold is refused. Also per_layer_config and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from test_export_gguf import bpe_tokenizer, hetero, tiny4

import trimformer
from trimformer import export
from trimformer.cli import main
from trimformer.export.deci import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    built_shapes,
    ffn_mult_for,
    ffn_width,
    load_deci,
    save_deci,
)
from trimformer.export.layout import ExportError, LayerShape
from trimformer.export.per_layer import add_per_layer_config
from trimformer.models import anatomy_of
from trimformer.structure import channels, surgery


def deci_cut(model):
    """Per-block FFN widths (one a multiple of 256), removed attention, removed MLP; query heads stay global."""
    an = anatomy_of(model)
    surgery.prune_neurons(an.blocks[0], range(40))
    surgery.prune_neurons(an.blocks[1], range(256))
    surgery.remove_attention(an, an.blocks[2])
    surgery.remove_mlp(an.blocks[3])
    return model


def test_ffn_mult_reproduces_only_multiples_of_256():
    assert ffn_width(ffn_mult_for(1536, 576), 576) == 1536  # SmolLM2's dense FFN
    assert ffn_width(ffn_mult_for(768, 576), 576) == 768
    assert ffn_mult_for(1152, 576) is None and ffn_mult_for(40, 64) is None


@torch.no_grad()
def test_config_keys_shapes_and_logits(ids, tmp_path):
    model = deci_cut(tiny4(intermediate_size=512))
    want = model(input_ids=ids).logits
    save_deci(model, tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
    for b in cfg["block_configs"]:  # every key written, also the null ones
        assert set(b["attention"]) == {"n_heads_in_group", "no_op", "replace_with_linear"}
        assert set(b["ffn"]) == {"ffn_mult", "intermediate_size", "no_op", "replace_with_linear"}
    blocks = cfg["block_configs"]
    assert blocks[0]["ffn"] == {"ffn_mult": None, "intermediate_size": 40, "no_op": False, "replace_with_linear": False}
    assert blocks[1]["ffn"]["ffn_mult"] == 6.0 and blocks[1]["ffn"]["intermediate_size"] == 256
    assert blocks[2]["attention"] == {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False}
    assert blocks[3]["ffn"]["no_op"] and blocks[0]["attention"]["n_heads_in_group"] == 2
    assert built_shapes(cfg) == [LayerShape(4, 2, 40), LayerShape(4, 2, 256), LayerShape(0, 0, 512),
                                 LayerShape(4, 2, 0)]
    with safe_open(str(tmp_path / "d" / WEIGHTS_FILE), "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.layers.0.mlp.up_proj.weight").get_shape() == [40, 64]
    # no tensor for a removed sublayer, nor for its norm (vLLM's loader has no parameter for it)
    assert "model.layers.2.input_layernorm.weight" not in names and "model.layers.2.self_attn.q_proj.weight" not in names
    assert "model.layers.3.post_attention_layernorm.weight" not in names and "lm_head.weight" not in names
    torch.testing.assert_close(load_deci(tmp_path / "d")(input_ids=ids).logits, want)


_VLLM_VIEW = """
import json, sys, transformers
c = transformers.AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
out = []
for b in c.block_configs:  # what vLLM's DeciLMDecoderLayer reads
    a, f = b.attention, b.ffn
    kv = 0 if a.no_op else c.num_attention_heads // a.n_heads_in_group
    ffn = 0 if f.no_op else ("mult" if hasattr(f, "ffn_mult") else f.intermediate_size)
    out.append([kv, ffn])
print(json.dumps({"blocks": out, "head_dim": c.head_dim, "heads": c.num_attention_heads, "type": c.model_type,
                  "trimformer": any(k.startswith("trimformer") for k in sys.modules)}))
"""


def test_shipped_config_class_reads_like_vllm(tmp_path):
    """In a process without trimformer: null fields are absent attributes, so vLLM takes intermediate_size."""
    model = deci_cut(tiny4(intermediate_size=512))
    an = anatomy_of(model)
    for b in (an.blocks[0], an.blocks[1], an.blocks[3]):  # one query head per KV group everywhere: 2 x 16 != 64
        surgery.prune_heads(b, [0, 2])
    save_deci(model, tmp_path / "d")
    assert (tmp_path / "d" / CONFIG_FILE).is_file()
    env = {"PYTHONPATH": "", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", _VLLM_VIEW, str(tmp_path / "d")], capture_output=True, text=True,
                       env=env, cwd=tmp_path, check=True)
    view = json.loads(r.stdout.strip().splitlines()[-1])
    assert view == {"blocks": [[2, 40], [2, "mult"], [0, "mult"], [2, 0]], "head_dim": 16, "heads": 2,
                    "type": "nemotron-nas", "trimformer": False}


@torch.no_grad()
def test_qwen2_biases_and_hidden_channels(ids, tmp_path):
    model = deci_cut(tiny4("qwen2", intermediate_size=512))
    channels.prune_channels(anatomy_of(model), range(60))  # hidden 64 -> 60: eps rescaled in every norm alike
    want = model(input_ids=ids).logits
    save_deci(model, tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["qkv_bias"] is True and cfg["attention_bias"] is False and cfg["hidden_size"] == 60
    torch.testing.assert_close(load_deci(tmp_path / "d")(input_ids=ids).logits, want)


def test_refuses_what_deci_cannot_hold(tmp_path):
    with pytest.raises(ExportError, match="--format gguf"):
        save_deci(hetero(tiny4()), tmp_path / "d")  # block 1 keeps 2 query heads, the others 4
    sparse = tiny4()
    with torch.no_grad():
        anatomy_of(sparse).blocks[1].attention.q.weight[:, 1::2] = 0
    with pytest.raises(ExportError, match="no speed"):
        save_deci(sparse, tmp_path / "d")
    assert not list(tmp_path.iterdir())


@torch.no_grad()
def test_per_layer_config_beside_our_keys(ids, tmp_path):
    """export.save writes transformers' per_layer_config (>= 5.14 reads per-layer shapes from it); transformers'
    config class reads it back, and our modeling file still loads the checkpoint with the same logits."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.configuration_utils import get_head_shapes

    model = hetero(tiny4())
    want = model(input_ids=ids).logits
    export.save(model, tmp_path / "m")
    written = json.loads((tmp_path / "m" / "config.json").read_text())
    assert written["per_layer_config"] == {"0": {"intermediate_size": 40},
                                           "1": {"num_attention_heads": 2, "num_key_value_heads": 1},
                                           "2": {"skip": ["mlp"]}, "3": {"skip": ["attention"]}}
    cfg = AutoConfig.from_pretrained(tmp_path / "m", trust_remote_code=True)
    layers = cfg.per_layer_config
    assert layers[0].intermediate_size == 40 and layers[1].num_attention_heads == 2
    assert layers[2].skip == ["mlp"] and layers[3].skip == ["attention"]
    assert get_head_shapes(cfg)[0][:2] == [2, 1]  # KV heads per layer, as a static cache would be sized
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True).eval()
    torch.testing.assert_close(vanilla(input_ids=ids).logits, want)
    torch.testing.assert_close(trimformer.load(tmp_path / "m")(input_ids=ids).logits, want)
    assert add_per_layer_config({"a": 1}, tiny4()) == {"a": 1}  # uniform: nothing added


@torch.no_grad()
def test_per_layer_config_follows_a_second_cut(ids, tmp_path):
    """A heterogeneous checkpoint loaded, cut again and saved: the new per_layer_config, none of the old one."""
    export.save(hetero(tiny4()), tmp_path / "a")
    model = trimformer.load(tmp_path / "a")
    surgery.prune_neurons(anatomy_of(model).blocks[3], range(8))  # keeps 8
    want = model(input_ids=ids).logits
    export.save(model, tmp_path / "b")
    layers = json.loads((tmp_path / "b" / "config.json").read_text())["per_layer_config"]
    assert layers["0"] == {"intermediate_size": 40} and layers["3"] == {"intermediate_size": 8, "skip": ["attention"]}
    torch.testing.assert_close(trimformer.load(tmp_path / "b")(input_ids=ids).logits, want)


@torch.no_grad()
def test_cli_export_and_prune_formats(ids, tmp_path, capsys):
    saved = tmp_path / "dense"
    tiny4().save_pretrained(saved)
    bpe_tokenizer().save_pretrained(saved)
    model = trimformer.load(saved)
    an = anatomy_of(model)
    surgery.prune_neurons(an.blocks[0], range(40))
    surgery.remove_attention(an, an.blocks[1])
    export.save(model, tmp_path / "cut", tokenizer=bpe_tokenizer())
    assert main(["-q", "export", str(tmp_path / "cut"), "--format", "deci"]) == 0
    torch.testing.assert_close(load_deci(tmp_path / "cut-deci")(input_ids=ids).logits, model(input_ids=ids).logits)
    assert main(["-q", "export", str(tmp_path / "cut"), "--format", "gguf", "--gguf-type", "q8_0"]) == 0
    assert (tmp_path / "cut-q8_0.gguf").is_file()
    fast = ["--calib-windows", "2", "--calib-length", "32", "--no-eval", "-q"]
    out = tmp_path / "p"
    assert main(["prune", "--model", str(saved), "--method", "width", "--target", "params=0.9",
                 "--format", "gguf", "--gguf-type", "f32", "--out", str(out), *fast]) == 0
    assert (out / "model-f32.gguf").is_file() and (out / "trimformer.json").is_file()
    capsys.readouterr()
    assert main(["prune", "--model", str(saved), "--method", "magnitude", "--sparsity", "0.5",
                 "--format", "deci", "--out", str(tmp_path / "s"), *fast]) == 2
    assert "compressed-tensors" in capsys.readouterr().err  # refused, and the cut kept in our own format
    assert trimformer.load(tmp_path / "s") is not None and not (tmp_path / "s" / CONFIG_FILE).exists()
