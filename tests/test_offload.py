"""Streaming (models/offload.py, export/streamed.py): a model pruned block by block from disk equals the same
model pruned in memory, holds one block at a time, spills activations, and writes a checkpoint that vanilla
transformers loads; failures write nothing."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny

import trimformer
from trimformer.export.streamed import save_streamed
from trimformer.models import offload, shards
from trimformer.models.footprint import footprint
from trimformer.models.load import ModelLoadError, load


@pytest.fixture(scope="module")
def calib4() -> torch.Tensor:
    return torch.randint(3, 259, (4, 32), generator=torch.Generator().manual_seed(1))  # (n, T)


def saved(tmp_path, family: str, blocks: int = 2):
    folder = tmp_path / f"src-{family}"
    if blocks == 2:
        model = tiny(family)
    else:  # conftest's tiny llama, deeper
        import transformers as T

        torch.manual_seed(0)
        model = T.LlamaForCausalLM(T.LlamaConfig(num_hidden_layers=blocks, hidden_size=64, num_attention_heads=4,
                                                 num_key_value_heads=2, intermediate_size=128, vocab_size=259,
                                                 max_position_embeddings=256, tie_word_embeddings=True))
    model.save_pretrained(folder)
    return folder


def pruned_both(tmp_path, folder, settings: dict, calib, budget: int | None = None):
    """(in-memory result, streamed result reloaded, the streamed model)."""
    ref = load(folder)
    trimformer.prune_(ref, trimformer.build(settings["method"], settings["with"]), calibration=calib, progress=False)
    model = load(folder, offload="disk", offload_dir=tmp_path / "scratch")
    if budget is not None:
        model.trimformer_offload.activation_budget = budget
    trimformer.prune_(model, trimformer.build(settings["method"], settings["with"]), calibration=calib, progress=False)
    save_streamed(model, tmp_path / "out")
    return ref, load(tmp_path / "out"), model


def assert_same(ref, back) -> None:
    a, b = ref.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k] == 0, b[k] == 0), f"mask of {k} differs"
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)


FP32 = {"precision": "fp32"}  # (tiny models: bf16 autocast only adds oneDNN set-up time; one case keeps 'auto')
CASES = [("llama", "wanda", FP32), ("llama", "sparsegpt", {}), ("llama", "magnitude", {}), ("qwen3", "sparsegpt", FP32),
         ("mistral", "wanda", FP32), ("qwen2", "wanda", FP32), ("gpt2", "sparsegpt", FP32), ("opt", "wanda", FP32),
         ("bert", "sparsegpt", FP32)]


@pytest.mark.parametrize("family,method,extra", CASES)
def test_streamed_equals_in_memory(tmp_path, calib4, family, method, extra):
    ref, back, _ = pruned_both(tmp_path, saved(tmp_path, family), {"method": method, "with": {"sparsity": 0.5, **extra}},
                               calib4)
    assert_same(ref, back)
    projs = [p.weight for _, p in trimformer.anatomy_of(back).projections()]
    assert sum(int(W.eq(0).sum()) for W in projs) / sum(W.numel() for W in projs) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("settings", [{"allocation": "global"}, {"allocation": "owl", **FP32},
                                      {"allocation": "adaptive", "importance": "kl", "probe_windows": 2, **FP32},
                                      {"allocation": "adaptive", **FP32}, {"pattern": "2:4", **FP32}])
def test_streamed_allocations_and_patterns_equal_in_memory(tmp_path, calib4, settings):
    method = "sparsegpt" if "pattern" in settings else "wanda"
    ref, back, _ = pruned_both(tmp_path, saved(tmp_path, "llama"), {"method": method, "with": settings}, calib4)
    assert_same(ref, back)


def test_one_block_in_memory_each_block_read_once_and_spill(tmp_path, calib4, monkeypatch):
    """SparseGPT streamed with every activation spilled to disk: still equal to the in-memory run; never more than
    one block materialised; each block and the embeddings read once while pruning (the head not at all); no
    scratch file left in the output."""
    folder = saved(tmp_path, "llama", blocks=3)
    most, reads = [], []
    real_load = offload.Offload.load

    def counting(self, unit):
        real_load(self, unit)
        most.append(sum(u.is_block and u.loaded for u in self.units))

    real_write = offload.Offload.sweep  # write_checkpoint starts with a sweep: the reads until then are pruning's

    def mark(self):
        reads.append(self.reads)
        real_write(self)

    monkeypatch.setattr(offload.Offload, "load", counting)
    monkeypatch.setattr(offload.Offload, "sweep", mark)
    ref, back, model = pruned_both(tmp_path, folder, {"method": "sparsegpt", "with": FP32}, calib4, budget=0)
    assert_same(ref, back)
    off = model.trimformer_offload
    assert off.spilled > 0 and max(most) == 1
    assert reads[-1] == sum(e.nbytes for k, e in off.entries.items() if ".layers." in k or "embed_tokens" in k)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_checkpoint_is_sharded_indexed_and_loads_in_transformers(tmp_path, calib4):
    from transformers import AutoModelForCausalLM

    folder = saved(tmp_path, "qwen2")
    model = load(folder, offload="disk", offload_dir=tmp_path / "s")
    trimformer.prune_(model, trimformer.build("wanda", FP32), calibration=calib4, progress=False)
    out = save_streamed(model, tmp_path / "out")
    index = json.loads((out / shards.INDEX).read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == sorted(set(index["weight_map"].values())) and len(files) == 2 + 2  # embed, 2 blocks, norm+head
    assert index["metadata"]["total_size"] == sum(e.nbytes for e in shards.folder_index(out).values())
    vanilla = AutoModelForCausalLM.from_pretrained(out)
    ids = calib4[:1]
    torch.testing.assert_close(vanilla(ids).logits, load(out)(ids).logits)


def test_streamed_forward_matches_in_memory_and_frees_everything(tmp_path, calib4):
    folder = saved(tmp_path, "gpt2")
    model = load(folder, offload="disk", offload_dir=tmp_path / "s")
    with torch.no_grad():
        torch.testing.assert_close(model(calib4).logits, load(folder)(calib4).logits, rtol=0, atol=0)
    assert model.trimformer_offload.resident_bytes() == 0
    assert all(p.is_meta for p in model.parameters())


def test_bfloat16_streamed_checkpoint_keeps_dtype(tmp_path, calib4):
    folder = saved(tmp_path, "llama")
    ref = load(folder, dtype="bfloat16")
    trimformer.prune_(ref, trimformer.build("sparsegpt", {}), calibration=calib4, progress=False)
    model = load(folder, dtype="bfloat16", offload="disk", offload_dir=tmp_path / "s")
    trimformer.prune_(model, trimformer.build("sparsegpt", {}), calibration=calib4, progress=False)
    assert ref.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    out = save_streamed(model, tmp_path / "out")
    assert {e.dtype for e in shards.folder_index(out).values()} == {torch.bfloat16}
    assert_same(ref, load(out, dtype="bfloat16"))


def test_missing_tensor_is_refused(tmp_path):
    folder = saved(tmp_path, "llama")
    t = shards.folder_index(folder)
    tensors = {k: shards.read(e) for k, e in t.items() if "layers.1.mlp.up_proj" not in k}
    shards.write(folder / shards.SINGLE, tensors)
    with pytest.raises(ModelLoadError, match="1 tensor.*missing: model.layers.1.mlp.up_proj.weight"):
        load(folder, offload="disk", offload_dir=tmp_path / "s")


def test_truncated_shard_is_refused(tmp_path):
    folder = saved(tmp_path, "llama")
    data = (folder / shards.SINGLE).read_bytes()
    (folder / shards.SINGLE).write_bytes(data[: len(data) // 2])
    with pytest.raises(offload.StreamError, match="damaged"):
        load(folder, offload="disk", offload_dir=tmp_path / "s")


def test_shard_writer_round_trip_with_safetensors(tmp_path):
    from safetensors.torch import load_file

    t = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7), "c": torch.tensor(True), "e": torch.ones(0)}
    shards.write(tmp_path / "x.safetensors", t)
    back = load_file(tmp_path / "x.safetensors")
    assert all(torch.equal(back[k], t[k]) for k in t)
    assert all(torch.equal(shards.read(e), t[k]) for k, e in shards.read_header(tmp_path / "x.safetensors").items())


def test_footprint_streamed_needs_less_and_auto_streams_when_short(tmp_path, monkeypatch):
    folder = saved(tmp_path, "llama", blocks=8)
    skel = offload.skeleton(folder, torch.float32)
    fp = footprint(skel, dtype=torch.float32, windows=4, length=32, hessian=True)
    assert fp.model == sum(e.nbytes for e in shards.folder_index(folder).values())
    assert fp.streamed - fp.working_set < fp.in_memory - fp.working_set
    assert "needs ~" in fp.describe(True) and "GB on disk" in fp.describe(True)
    from trimformer.models import footprint as fpmod

    monkeypatch.setattr(fpmod, "available_memory", lambda device: 10)  # nothing fits
    assert offload.streamed(load(folder, offload="auto", offload_dir=tmp_path / "s"))
    monkeypatch.setattr(fpmod, "available_memory", lambda device: 2**40)
    assert not offload.streamed(load(folder, offload="auto"))
