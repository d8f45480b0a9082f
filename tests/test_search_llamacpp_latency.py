"""search --latency-from llamacpp: the per-block table solved from whole-model GGUF timings (a fake timer that reads
the written file stands in for llama.cpp), the refusal without the engine, and an optional real run."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
import tempfile

import gguf
import pytest
import torch
from test_export_gguf import tiny4

import trimformer
from trimformer.export.gguf import write_gguf
from trimformer.export.llamacpp_latency import ENV, LlamaCppTimer, engine_python, llamacpp_latency_table
from trimformer.models import anatomy_of
from trimformer.structure import surgery
from trimformer.structure.options import ENGINE_LATENCY, Option, keep_n, options

FIXED, HEAD, KV, NEURON = 0.5, 0.1, 0.05, 0.001  # the fake engine's seconds: outside the blocks, per head, neuron


def layer_counts(path) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, FFN width) of every layer the GGUF holds."""
    r = gguf.GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    n = r.fields[f"{arch}.block_count"].contents()

    def per_layer(key):
        v = r.fields[f"{arch}.{key}"].contents()
        return v if isinstance(v, list) else [v] * n

    return list(zip(per_layer("attention.head_count"), per_layer("attention.head_count_kv"),
                    per_layer("feed_forward_length")))


def fake_timer(path) -> float:
    """A linear engine: FIXED plus, per layer, HEAD per query head, KV per KV head, NEURON per FFN neuron."""
    return FIXED + sum(HEAD * h + KV * k + NEURON * f for h, k, f in layer_counts(path))


def expected(block, o: Option, multiple_of: int) -> float:
    """What the fake engine charges for `block` under option o, from the option's own counts."""
    if not o.attn and o.ffn == 0:
        return 0.0
    a = block.attention
    per = a.num_heads // a.num_kv_heads
    kv = (o.kv if 0 < o.kv < a.num_kv_heads else a.num_kv_heads) if o.attn else 0
    heads = kv * (o.q if 0 < o.q < per else per) if o.attn else 0
    ffn = block.mlp.intermediate_size if o.ffn == 1 else keep_n(block, o.ffn, multiple_of) if o.ffn else 1
    return HEAD * heads + KV * kv + NEURON * ffn


@torch.no_grad()
def test_the_table_is_solved_from_whole_model_timings():
    """Blocks 0-2 share a shape, block 3 has a narrower FFN: every option of every block, the part outside the blocks
    and the dense total come out as the linear engine charges them, FFN widths rounded as the search builds them."""
    model = tiny4()
    an = anatomy_of(model)
    surgery.prune_neurons(an.blocks[3], range(96))
    opts = options([0.3, 0.0], attention=True, kv=[1], q=[1])
    t = llamacpp_latency_table(an, opts, multiple_of=32, timer=fake_timer)
    for b, row in zip(an.blocks, t["blocks"]):
        assert set(row) == set(opts)
        for o in opts:
            assert row[o] == pytest.approx(expected(b, o, 32), abs=1e-9), (b.index, o.name)
    assert keep_n(an.blocks[0], 0.3, 32) == 64 and keep_n(an.blocks[3], 0.3, 32) == 32  # rounded up to 32s
    assert t["fixed_s"] == pytest.approx(FIXED)
    assert t["dense_s"] == pytest.approx(fake_timer_of(model))
    assert t["blocks"][0] is not t["blocks"][3] and t["blocks"][0] == t["blocks"][1]


def fake_timer_of(model) -> float:
    """The fake engine's seconds for the whole model as it is."""
    with tempfile.TemporaryDirectory() as d:
        write_gguf(model, os.path.join(d, "m.gguf"), qtype="f32")
        return fake_timer(os.path.join(d, "m.gguf"))


def test_search_keeps_the_engine_table_and_refuses_it_for_torch(calib, tmp_path, monkeypatch):
    """The search reads llama.cpp's table through --latency-table FILE, marked as llama.cpp's; a torch search refuses
    that file rather than mix costs measured in two engines."""
    monkeypatch.setitem(ENGINE_LATENCY, "llamacpp", functools.partial(llamacpp_latency_table, timer=fake_timer))
    path = tmp_path / "table.json"
    spec = {"target": "latency=0.8", "widths": "0.5,0", "kv_groups": "none", "query_heads": "none",
            "latency_from": "llamacpp", "latency_table": str(path), "windows": 2}
    res = trimformer.prune_(tiny4(), trimformer.build("search", spec), calibration=calib,
                            progress=False).trimformer_history[-1]["result"]
    saved = json.loads(path.read_text())
    assert saved["source"] == "llamacpp" and saved["fixed_s"] == pytest.approx(FIXED)
    assert saved["blocks"][0]["attn+ffn0.5"] == pytest.approx(HEAD * 4 + KV * 2 + NEURON * 64)
    assert res["predicted_latency"] <= 0.8 + 1e-9
    with pytest.raises(ValueError, match="measured in llamacpp, the search asks for torch: pass --latency-from llamacpp"):
        trimformer.prune_(tiny4(), trimformer.build("search", {**spec, "latency_from": "torch"}), calibration=calib,
                          progress=False)


def test_without_the_engine_a_one_line_error_names_the_install(calib, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ValueError, match=r"/nonexistent/python cannot import llama_cpp.*pip install "
                                         r"llama-cpp-python==0\.3\.36.*--engine-python") as e:
        trimformer.prune_(tiny4(), trimformer.build("search", {"target": "latency=0.8", "latency_from": "llamacpp",
                                                               "engine_python": "/nonexistent/python", "windows": 2}),
                          calibration=calib, progress=False)
    assert "\n" not in str(e.value)
    monkeypatch.setenv(ENV, "/nonexistent/python")  # the variable is read when no --engine-python is given
    with pytest.raises(ValueError, match="/nonexistent/python cannot import llama_cpp"):
        engine_python()
    if importlib.util.find_spec("llama_cpp") is None:  # this interpreter, the last resort
        monkeypatch.delenv(ENV)
        with pytest.raises(ValueError, match=f"{sys.executable} cannot import llama_cpp"):
            engine_python()


def test_one_shape_per_block_is_refused():
    model = tiny4(num_hidden_layers=2)
    an = anatomy_of(model)
    surgery.prune_neurons(an.blocks[1], range(64))
    with pytest.raises(ValueError, match="two blocks of one shape.*--latency-from torch"):
        llamacpp_latency_table(an, options([0.5]), timer=fake_timer)


@torch.no_grad()
def test_llamacpp_times_the_variants():
    """Optional: real llama.cpp (this Python, or $TRIMFORMER_ENGINE_PYTHON) times every variant of a tiny model."""
    try:
        py = engine_python()
    except ValueError:
        pytest.skip("llama_cpp is not importable (set TRIMFORMER_ENGINE_PYTHON to a Python that has it)")
    an = anatomy_of(tiny4(hidden_size=256, intermediate_size=2048, num_hidden_layers=3))  # blocks of ~10 ms
    opts = options([0.25, 0.0], kv=[1])
    t = llamacpp_latency_table(an, opts, timer=LlamaCppTimer(py, tokens=256, runs=3))
    full, quarter = t["blocks"][0][Option(True, 1.0)], t["blocks"][0][Option(True, 0.25)]
    assert t["dense_s"] > t["fixed_s"] >= 0 and full > quarter > 0 and all(row[opts[-1]] == 0.0 for row in t["blocks"])
