"""Surgery: removing zeroed structure leaves the logits identical, for every adapter family."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ALL_FAMILIES, DECODERS, tiny

from trimformer.models import anatomy_of
from trimformer.structure import channels, surgery
from trimformer.structure.surgery import SurgeryError


def _out(model, ids):
    if model.config.model_type == "vit":
        torch.manual_seed(0)
        return model(pixel_values=_pixels()).logits
    o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _deeper(model, n):
    """Copy the model's blocks until it has `n` (conftest's tiny models have 2)."""
    an = anatomy_of(model)
    layers = an.block_list
    for i in range(len(layers), n):
        layers.append(copy.deepcopy(layers[i % 2]))
    for i, layer in enumerate(layers):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    cfg = model.config
    cfg.num_hidden_layers = n
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i % 2] for i in range(n)]  # block i copies block i % 2
    return model


def _pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def _zero_neurons(block, drop):
    mlp = block.mlp
    for p in (mlp.up, mlp.gate):
        if p is not None:
            p.weight[drop] = 0
            if p.bias is not None:
                p.bias[drop] = 0
    mlp.down.weight[:, drop] = 0


@torch.no_grad()
def _zero_heads(block, heads):
    a = block.attention
    D = a.head_dim
    cols = torch.cat([torch.arange(h * D, (h + 1) * D) for h in heads])
    a.o.weight[:, cols] = 0


@pytest.mark.parametrize("family", ALL_FAMILIES)
@torch.no_grad()
def test_removing_zeroed_neurons_and_heads_keeps_logits(family, ids):
    model = tiny(family)
    an = anatomy_of(model)
    b0, b1 = an.blocks
    H, Hkv = b0.attention.num_heads, b0.attention.num_kv_heads
    drop_n = torch.tensor([0, 5, 17, 100])
    _zero_neurons(b0, drop_n)
    # one query head per KV group (keeps GQA valid) or one head for plain MHA
    group = H // Hkv
    drop_h = [g * group for g in range(Hkv)] if group > 1 else [1]
    _zero_heads(b1, drop_h)
    before = _out(model, ids)
    ffn = b0.mlp.intermediate_size
    surgery.prune_neurons(b0, [i for i in range(b0.mlp.intermediate_size) if i not in drop_n.tolist()])
    surgery.prune_heads(b1, [h for h in range(H) if h not in drop_h])
    surgery.sync_config(anatomy_of(model))
    after = _out(model, ids)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    an2 = anatomy_of(model)
    assert an2.blocks[0].mlp.intermediate_size == ffn - 4
    assert an2.blocks[1].attention.num_heads == H - len(drop_h)
    assert an2.blocks[1].attention.num_kv_heads == (Hkv if group > 1 else H - 1)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "opt"])
@torch.no_grad()
def test_removing_zeroed_kv_group_keeps_logits(family, ids):
    model = tiny(family)
    a = anatomy_of(model).blocks[0].attention
    H, Hkv = a.num_heads, a.num_kv_heads
    group = H // Hkv
    dead = [h for h in range(H) if h // group == 0]  # every query head of KV group 0
    _zero_heads(anatomy_of(model).blocks[0], dead)
    before = _out(model, ids)
    surgery.prune_heads(anatomy_of(model).blocks[0], [h for h in range(H) if h not in dead])
    torch.testing.assert_close(_out(model, ids), before, atol=1e-5, rtol=1e-5)
    assert anatomy_of(model).blocks[0].attention.num_kv_heads == (Hkv - 1 if group > 1 else H - len(dead))


def test_gqa_must_stay_even():
    model = tiny("llama")  # 4 query heads over 2 KV heads
    block = anatomy_of(model).blocks[0]
    with pytest.raises(SurgeryError, match="same number of query heads per kept KV group"):
        surgery.prune_heads(block, [0, 1, 2])
    with pytest.raises(SurgeryError, match=r"in \[0, 4\)"):
        surgery.prune_heads(block, [0, 7])
    with pytest.raises(SurgeryError, match="uses a removed KV head"):
        surgery.prune_heads(block, [0, 2], keep_kv=[0])


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
@torch.no_grad()
def test_removing_zeroed_channels_is_exact_with_rmsnorm(family, ids):
    model = tiny(family)
    an = anatomy_of(model)
    drop = torch.tensor([3, 10, 40])
    an.embed.weight[:, drop] = 0
    for b in an.blocks:
        b.attention.o.weight[drop] = 0
        b.mlp.down.weight[drop] = 0
    if an.head is not None and not an.tied:
        an.head.weight[:, drop] = 0
    before = _out(model, ids)
    keep = [i for i in range(64) if i not in drop.tolist()]
    channels.prune_channels(an, keep)
    assert surgery.sync_config(anatomy_of(model))
    torch.testing.assert_close(_out(model, ids), before, atol=1e-4, rtol=1e-4)
    assert model.config.hidden_size == 61
    if an.tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("family", ALL_FAMILIES)
@torch.no_grad()
def test_channel_removal_runs_and_config_matches(family, ids):
    model = tiny(family)
    an = anatomy_of(model)
    if family == "gemma3":  # its embedding scale, sqrt(hidden_size), would not reload the same: refused
        with pytest.raises(surgery.SurgeryError, match="sqrt"):
            channels.prune_channels(an, list(range(0, 64, 2)))
        return
    channels.prune_channels(an, list(range(0, 64, 2)))
    surgery.sync_config(an)
    out = _out(model, ids)
    assert torch.isfinite(out).all()
    an2 = anatomy_of(model)
    assert an2.hidden_size == 32
    for b in an2.blocks:
        for p in b.projections().values():
            assert 32 in (p.in_features, p.out_features)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt", "vit"])
@torch.no_grad()
def test_removing_sublayers_equals_zeroing_them(family, ids):
    model = tiny(family)
    an = anatomy_of(model)
    b = an.blocks[1]
    b.attention.o.weight.zero_()
    if b.attention.o.bias is not None:
        b.attention.o.bias.zero_()
    m = an.blocks[0].mlp
    m.down.weight.zero_()
    if m.down.bias is not None:
        m.down.bias.zero_()
    before = _out(model, ids)
    surgery.remove_attention(an, b)
    surgery.remove_mlp(an.blocks[0])
    an2 = anatomy_of(model)
    assert an2.blocks[1].attention is None
    assert an2.blocks[0].mlp is None or an2.blocks[0].mlp.intermediate_size == 0
    torch.testing.assert_close(_out(model, ids), before, atol=1e-5, rtol=1e-5)


def test_post_norm_sublayer_removal_is_refused():
    an = anatomy_of(tiny("bert"))
    with pytest.raises(SurgeryError, match="pre-norm"):
        surgery.remove_attention(an, an.blocks[0])


@pytest.mark.parametrize("family", DECODERS)
@torch.no_grad()
def test_generation_with_cache_after_block_and_attention_removal(family):
    model = _deeper(tiny(family), 4)
    an = anatomy_of(model)
    surgery.remove_blocks(an, [0, 2])
    an = anatomy_of(model)
    if an.blocks[0].pre_norm:
        surgery.remove_attention(an, an.blocks[0])  # the first layer's cache slot holds only lengths
    assert len(anatomy_of(model).blocks) == 2
    prompt = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    gen = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    nocache = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(gen, nocache)
    with pytest.raises(SurgeryError, match="keep at least one"):
        surgery.remove_blocks(anatomy_of(model), [0, 1])
