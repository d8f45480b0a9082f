"""Hidden-channel cuts (structure/channels.py, width parts=hidden) on tiny random DINOv2, ViT and LLaMA models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny
from test_structure_vision import _images, vanilla_features

import trimformer
from trimformer.export import structured as export
from trimformer.models import anatomy_of, count_parameters
from trimformer.structure import channels
from trimformer.structure.costs import matmul_params
from trimformer.structure.surgery import SurgeryError


@torch.no_grad()
def _out(model, x):
    return model(input_ids=x).logits if x.dtype == torch.long else model(pixel_values=x).last_hidden_state


@pytest.mark.parametrize("family", ["dinov2", "vit", "llama", "mistral", "qwen2"])
@torch.no_grad()
def test_cost_of_a_channel_is_what_its_removal_takes(family):
    model = tiny(family)  # llama ties its head to the embedding, mistral does not
    an = anatomy_of(model)
    params, flops = count_parameters(model), matmul_params(an)
    per, per_mm = channels.channel_params(an), channels.channel_matmul(an)
    channels.prune_channels(an, range(an.hidden_size - 3))
    an2 = anatomy_of(model)
    assert an2.hidden_size == model.config.hidden_size == 61
    assert params - count_parameters(model) == 3 * per
    assert flops - matmul_params(an2) == 3 * per_mm


@torch.no_grad()
def test_dinov2_every_tensor_of_the_stream_shrinks():
    model = tiny("dinov2")
    channels.prune_channels(anatomy_of(model), range(0, 64, 2))
    e = model.embeddings
    assert e.cls_token.shape == (1, 1, 32) and e.mask_token.shape == (1, 32) and e.position_embeddings.shape[-1] == 32
    assert e.patch_embeddings.projection.weight.shape == (32, 3, 8, 8)
    layer = model.encoder.layer[0]
    assert layer.layer_scale1.lambda1.shape == (32,) and layer.norm2.weight.shape == (32,)
    assert layer.attention.q_proj.weight.shape == (64, 32) and layer.attention.o_proj.weight.shape == (32, 64)
    assert layer.mlp.fc1.weight.shape == (128, 32) and layer.mlp.fc2.bias.shape == (32,)
    assert model.layernorm.weight.shape == (32,)
    assert torch.isfinite(_out(model, _images(2))).all()


@torch.no_grad()
def _zero_channels(model, drop: list[int]) -> None:
    """Make channels `drop` identically zero in the residual stream: nothing writes them."""
    an = anatomy_of(model)
    if isinstance(an.embed, torch.nn.Embedding):
        an.embed.weight[:, drop] = 0
    else:
        an.embed.weight[drop] = 0
        an.embed.bias[drop] = 0
        e = model.embeddings
        e.cls_token[..., drop] = 0
        e.position_embeddings[..., drop] = 0
    for b in an.blocks:
        for p in (b.attention.o, b.mlp.down):
            p.weight[drop] = 0
            if p.bias is not None:
                p.bias[drop] = 0


def test_zero_channels_score_zero_and_go_first_rmsnorm_exact(calib, ids):
    """Mistral (LLaMA-like, RMSNorm, untied head): channels nothing writes have zero importance, are the ones cut, and the output is unchanged
    (the norm weight and eps are rescaled for the shorter mean square)."""
    model = tiny("mistral")
    drop = [3, 10, 40, 41]
    _zero_channels(model, drop)
    an = anatomy_of(model)
    sc = channels.channel_scores(an, calib, 2, "fisher")
    assert set(sc.topk(4, largest=False).indices.tolist()) == set(drop) and sc[drop].abs().max() == 0
    want = _out(model, ids)
    cut = channels.channel_params(an) * 4 / count_parameters(model)
    trimformer.prune_(model, trimformer.build("width", {"parts": ["hidden"], "importance": "fisher",
                                                        "target": f"params={1 - cut + 1e-6}", "compensate": False}),
                      calibration=calib, progress=False)
    assert model.config.hidden_size == 60 and model.trimformer_history[-1]["result"]["hidden"] == 60
    torch.testing.assert_close(_out(model, ids), want, atol=1e-4, rtol=1e-4)


def test_zero_channel_with_layernorm_changes_only_the_statistics():
    """DINOv2 (LayerNorm): a channel nothing writes scores zero and goes first, but its removal changes every norm's
    mean and variance (over 63 channels instead of 64 with a zero): the output moves, by much less than removing
    the most important channel moves it. This is the approximation channels.py names."""
    model = tiny("dinov2")
    _zero_channels(model, [5])
    an = anatomy_of(model)
    px = _images(6, seed=3)
    sc = channels.channel_scores(an, _images(), 4, "fisher")
    assert sc.argmin() == 5 and sc[5] == 0
    want = _out(model, px)
    zero, top = copy.deepcopy(model), copy.deepcopy(model)
    channels.prune_channels(anatomy_of(zero), [c for c in range(64) if c != 5])
    channels.prune_channels(anatomy_of(top), [c for c in range(64) if c != int(sc.argmax())])
    err_zero = (_out(zero, px) - want[..., [c for c in range(64) if c != 5]]).norm()
    keep = [c for c in range(64) if c != int(sc.argmax())]
    err_top = (_out(top, px) - want[..., keep]).norm()
    assert 0 < err_zero < 0.5 * err_top


@torch.no_grad()
def test_taylor_is_the_derivative_of_the_loss_in_the_channels_scale(calib):
    """The mask gradient summed over writes equals d/da of the loss when channel c of every write (embedding,
    o_proj rows, down_proj rows) is scaled by a: central finite difference at a = 1."""
    model = tiny("mistral").double()
    an = anatomy_of(model)
    sc = channels.channel_scores(an, calib, 4, "taylor")

    def loss(c: int, a: float) -> float:
        m = copy.deepcopy(model)
        mn = anatomy_of(m)
        mn.embed.weight[:, c] *= a
        for b in mn.blocks:
            b.attention.o.weight[c] *= a
            b.mlp.down.weight[c] *= a
        logits = m(input_ids=calib).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), calib[:, 1:].reshape(-1),
                                                 reduction="sum").item()

    for c in (0, 17, 50):  # a step of 1e-2: the norms compute in float32, a smaller one sees their rounding
        fd = (loss(c, 1.01) - loss(c, 0.99)) / 0.02
        assert sc[c].item() == pytest.approx(abs(fd), rel=2e-4)


def test_dinov2_joint_cut_reloads_in_vanilla_transformers(tmp_path):
    """Heads, neurons and channels in one global Fisher budget, 2 rounds; export; a process without trimformer
    reloads it with the same features."""
    model = tiny("dinov2")
    _zero_channels(model, [1, 7, 30, 31, 50])  # importance 0: the global allocation takes them first
    before = count_parameters(model)
    trimformer.prune_(model, trimformer.build("width", {"parts": ["ffn", "heads", "hidden"], "importance": "fisher",
                                                        "allocation": "global", "target": "params=0.6", "rounds": 2}),
                      calibration=_images(), batch_size=4, progress=False)
    res = model.trimformer_history[-1]["result"]
    assert res["hidden"] == model.config.hidden_size < 64
    assert count_parameters(model) / before == pytest.approx(0.6, abs=0.02)
    px = _images(2, seed=5)
    assert torch.equal(vanilla_features(model, px, tmp_path), _out(model, px))


def test_llama_uniform_hidden_cut_is_a_plain_checkpoint(calib, ids, tmp_path):
    """Channels alone, uniform: every layer keeps its shape, so the config alone rebuilds the model (rms_norm_eps
    carries the rescaled eps) and vanilla AutoModelForCausalLM reloads it without remote code."""
    from transformers import AutoModelForCausalLM

    model = tiny("llama")
    trimformer.prune_(model, trimformer.build("width", {"parts": ["hidden"], "importance": "fisher",
                                                        "target": "params=0.8", "multiple_of": 8}),
                      calibration=calib, progress=False)
    assert model.config.hidden_size % 8 == 0 and model.config.hidden_size < 64
    want = _out(model, ids)
    export.save(model, tmp_path / "m")
    assert not (tmp_path / "m" / "trimformer_modeling.py").exists()
    torch.testing.assert_close(_out(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), ids), want)


def test_bad_input_is_refused(calib):
    with pytest.raises(ValueError, match="importance=fisher"):
        trimformer.build("width", {"parts": ["hidden"], "importance": "hessian", "target": "params=0.8"})
    model = tiny("dinov2")
    with pytest.raises(ValueError, match="zero mean"):
        channels.channel_scores(anatomy_of(model), _images(), 4, "taylor")
    with pytest.raises(ValueError, match="pre-norm"):
        channels.channel_scores(anatomy_of(tiny("bert")), calib, 2, "fisher")
    gemma = anatomy_of(tiny("gemma3"))  # its embedding scale, sqrt(hidden_size), would change on reload
    with pytest.raises(ValueError, match="sqrt"):
        channels.channel_scores(gemma, calib, 2, "fisher")
    with pytest.raises(SurgeryError, match="sqrt"):
        channels.prune_channels(gemma, list(range(32)))
    with pytest.raises(SurgeryError, match=r"in \[0, 64\)"):
        channels.prune_channels(anatomy_of(model), [0, 64])
    with pytest.raises(SurgeryError, match="0 hidden channels"):
        channels.prune_channels(anatomy_of(model), [])
    with pytest.raises(ValueError, match="filter_fn"):
        trimformer.prune_(model, trimformer.build("width", {"parts": ["ffn", "hidden"], "importance": "fisher",
                                                            "target": "params=0.8"}),
                          calibration=_images(), batch_size=4, progress=False,
                          filter_fn=lambda _m, name: not name.startswith("encoder.layer.0."))


def test_llama_like_joint_cut_reloads_in_vanilla_transformers(calib, ids, tmp_path):
    """A causal LM: heads and neurons (block-local Fisher) and channels (whole-model Fisher) in one global budget;
    the channels nothing writes go first; export and a process without trimformer give the same logits."""
    from test_structure_export import _assert_vanilla_reload

    model = tiny("mistral")
    _zero_channels(model, [2, 9, 33])
    trimformer.prune_(model, trimformer.build("width", {"parts": "ffn,heads,hidden", "importance": "fisher",
                                                        "allocation": "global", "target": "params=0.7"}),
                      calibration=calib, progress=False)
    assert model.config.hidden_size < 62 and model.trimformer_history[-1]["result"]["hidden"] == model.config.hidden_size
    _assert_vanilla_reload(model, ids, tmp_path)


def test_the_kept_channels_are_recorded_and_distillation_reads_the_teachers_on_them():
    from trimformer.recover import FeatureDistillConfig, distill_features_

    dense = tiny("dinov2")
    _zero_channels(dense, [4, 20])
    model = copy.deepcopy(dense)
    channels.prune_channels(anatomy_of(model), [c for c in range(64) if c != 4])
    channels.prune_channels(anatomy_of(model), [c for c in range(63) if c != 19])  # original channel 20
    assert model.trimformer_channels.tolist() == [c for c in range(64) if c not in (4, 20)]
    distill_features_(model, dense, _images(8), FeatureDistillConfig(steps=2, batch_size=4), progress=False)
    assert model.trimformer_history[-1]["result"]["steps_run"] == 2
    del model.trimformer_channels
    with pytest.raises(ValueError, match="does not record which it kept"):
        distill_features_(model, dense, _images(8), FeatureDistillConfig(steps=2, batch_size=4), progress=False)
