"""The cached-state KL probe and the Puzzle-style search on tiny decoders."""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny
from test_structure_surgery import _deeper

import trimformer
from trimformer.models import anatomy_of, count_parameters
from trimformer.structure.budget import BudgetError
from trimformer.structure.importance import probe_stats
from trimformer.structure.options import ffn_cut, head_cut, latency_table, options, score_library
from trimformer.structure.probe import Probe, silenced, swapped


def _full_kl(model, dense, ids):
    with torch.no_grad():
        p = F.log_softmax(dense(input_ids=ids).logits.float(), -1)
        q = F.log_softmax(model(input_ids=ids).logits.float(), -1)
    return F.kl_div(q, p, log_target=True, reduction="sum").item() / p[..., 0].numel()


@torch.no_grad()
def test_probe_from_any_block_equals_a_full_forward(calib):
    model = _deeper(tiny("llama"), 4)
    dense = copy.deepcopy(model)
    an = anatomy_of(model)
    probe = Probe(an, calib, precision="fp32")
    assert all(probe.kl_from(i) == pytest.approx(0.0, abs=1e-7) for i in range(4))
    with silenced(an.blocks[2], "attn"):  # re-running from block 2 only == the whole model
        assert probe.kl_from(2) == pytest.approx(_full_kl(model, dense, calib), rel=1e-4)
    with silenced(an.blocks[1], "mlp"):
        probe.refresh(1)  # cache now holds the inputs with block 1's MLP silenced
        with silenced(an.blocks[3], "attn"):
            assert probe.kl_from(3) == pytest.approx(_full_kl(model, dense, calib), rel=1e-4)
    with pytest.raises(ValueError, match="causal LM"):
        Probe(anatomy_of(tiny("bert")), calib)


@torch.no_grad()
def test_padded_ffn_cut_scores_what_the_surgery_gives(calib):
    from trimformer.structure import surgery

    model = _deeper(tiny("llama"), 3)
    dense = copy.deepcopy(model)
    an = anatomy_of(model)
    probe = Probe(an, calib, precision="fp32")
    b = an.blocks[1]
    cut = ffn_cut(b, 48, probe_stats(probe, b))
    with swapped(b.mlp.down, cut.padded(b.mlp.intermediate_size)):
        kl = probe.kl_from(1)
    assert torch.equal(b.mlp.down.weight, dense.model.layers[1].mlp.down_proj.weight)  # restored
    surgery.prune_neurons(b, cut.keep)
    b.mlp.down.weight.copy_(cut.W)
    assert b.mlp.intermediate_size == 48
    # the probe's KL is a difference of logsumexps (exact in math): fp32 rounding leaves ~1e-8 absolute
    assert kl == pytest.approx(_full_kl(model, dense, calib), rel=1e-4, abs=5e-8)


@torch.no_grad()
@pytest.mark.parametrize("key,kept", [(("kv", 1), ([[0, 1], [2, 3]], (2, 1))), (("q", 1), (None, (2, 2)))])
def test_padded_head_cut_scores_what_the_surgery_gives(calib, key, kept):
    from trimformer.structure import surgery

    model = _deeper(tiny("llama"), 3)  # 4 query heads in 2 KV groups
    dense = copy.deepcopy(model)
    an = anatomy_of(model)
    probe = Probe(an, calib, precision="fp32")
    b = an.blocks[1]
    a = b.attention
    cut = head_cut(b, key, probe_stats(probe, b, a.o))
    heads, shape = kept
    if heads is not None:
        assert cut.heads.tolist() in heads  # a whole group: both of its query heads
    else:
        assert sorted(h // 2 for h in cut.heads.tolist()) == [0, 1]  # one query head in every group
    with swapped(a.o, cut.padded(a.o.in_features), cut.b):
        kl = probe.kl_from(1)
    assert torch.equal(a.o.weight, dense.model.layers[1].self_attn.o_proj.weight)  # restored
    surgery.prune_heads(b, cut.heads)
    a.o.weight.copy_(cut.W)
    assert (a.num_heads, a.num_kv_heads) == shape
    assert kl == pytest.approx(_full_kl(model, dense, calib), rel=1e-4, abs=5e-8)  # KL from a logsumexp difference: ~1e-8 fp32 residue


def test_search_takes_planted_dead_query_heads(calib):
    model = _deeper(tiny("llama"), 4)
    an = anatomy_of(model)
    a = an.blocks[2].attention
    D = a.head_dim
    with torch.no_grad():  # heads 0 and 3 (one in each KV group) of block 2 add nothing; the others matter
        for b in an.blocks:  # (sharp attention: two heads of a group then read different tokens of the shared V)
            b.attention.q.weight.mul_(8)
            b.attention.o.weight.mul_(8)
        a.o.weight[:, :D] = 0
        a.o.weight[:, 3 * D:] = 0
    n0 = count_parameters(model)
    gone = (a.q.weight.numel() + a.o.weight.numel()) / 2  # half the query heads: q rows and o columns
    res = trimformer.prune_(model, trimformer.build("search", {"target": f"params={(n0 - gone) / n0 + 1e-7}",
                                                                "widths": "", "kv_groups": "none",
                                                                "precision": "fp32"}),
                            calibration=calib, progress=False).trimformer_history[-1]["result"]
    assert res["choices"][2] == "attn-q1+ffn1" and all(c == "attn+ffn1" for i, c in enumerate(res["choices"]) if i != 2)
    assert count_parameters(model) == n0 - gone
    b = anatomy_of(model).blocks[2].attention
    assert (b.num_heads, b.num_kv_heads) == (2, 2)
    with pytest.raises(ValueError, match="query_heads"):
        trimformer.build("search", {"query_heads": "x"})


def test_search_takes_the_planted_dead_kv_group_and_reloads(calib, tmp_path):
    model = _deeper(tiny("llama"), 4)
    an = anatomy_of(model)
    a = an.blocks[1].attention
    with torch.no_grad():
        a.o.weight[:, 2 * a.head_dim:] = 0  # heads 2 and 3 (KV group 1) of block 1 add nothing
    n0 = count_parameters(model)
    group = sum(p.weight.numel() for p in a.projections.values()) / 2
    share = (n0 - group) / n0 + 1e-7  # the budget asks exactly one KV group's parameters
    # fp32 scores: under bf16 autocast a real query head of this tiny random model scores about -1e-6, a tie
    # with the dead group at 0 (KLs are clipped at 0) that the MIP may break either way
    res = trimformer.prune_(model, trimformer.build("search", {"target": f"params={share}", "widths": "0.5",
                                                                "multiple_of": 1, "precision": "fp32"}),
                            calibration=calib, progress=False).trimformer_history[-1]["result"]
    assert res["choices"][1] == "attn-kv1+ffn1" and all(c == "attn+ffn1" for i, c in enumerate(res["choices"]) if i != 1)
    assert count_parameters(model) == n0 - group
    assert anatomy_of(model).blocks[1].attention.num_kv_heads == 1
    from trimformer import export

    export.save(model, tmp_path / "m")  # per-layer head counts: the auto_map layout
    again = trimformer.load(str(tmp_path / "m"))
    with torch.no_grad():
        assert torch.allclose(again(input_ids=calib).logits, model(input_ids=calib).logits, atol=1e-5)
    with pytest.raises(ValueError, match="kv_groups"):
        trimformer.build("search", {"kv_groups": "0"})


def test_library_finds_planted_dead_sublayers(calib):
    model = _deeper(tiny("llama"), 4)
    an = anatomy_of(model)
    with torch.no_grad():
        an.blocks[0].attention.o.weight.zero_()
        an.blocks[2].mlp.down.weight.zero_()
    errors, cuts = score_library(an, Probe(an, calib, precision="fp32"), [0.5, 0.0], progress=False)
    assert errors[0]["attn"] == pytest.approx(0.0, abs=1e-7) and errors[2][0.0] == pytest.approx(0.0, abs=1e-7)
    assert min(errors[i]["attn"] for i in (1, 2, 3)) > 1e-4
    assert all(e[0.0] >= e[0.5] - 1e-9 for i, e in enumerate(errors) if i != 2)  # cutting less hurts less
    assert set(cuts[1]) == {0.5}


def _option_error(choice: str, errors: dict[str, float]) -> float:
    """The measured error of a choice such as 'attn-kv1+ffn0.5' or 'removed' (attention and FFN errors add,
    each clipped at 0 as a KL is)."""
    attn, ffn = ("no-attn", "ffn0") if choice == "removed" else choice.split("+")
    a = {"attn": 0.0, "no-attn": errors.get("attn", 0.0)}.get(attn)
    if a is None:  # attn-kvK or attn-qH: a head cut, keyed ('kv', K) / ('q', H)
        kind, n = re.fullmatch(r"attn-(kv|q)(\d+)", attn).groups()
        a = errors[str((kind, int(n)))]
    return max(0.0, a) + max(0.0, errors[str(float(ffn[3:]))])


def test_search_params_budget_respected_and_dead_parts_chosen(calib):
    model = _deeper(tiny("llama"), 4)
    an = anatomy_of(model)
    with torch.no_grad():
        an.blocks[1].attention.o.weight.zero_()
        an.blocks[1].mlp.down.weight.zero_()  # block 1 is the identity: removing it is free
    n0 = count_parameters(model)
    ref = copy.deepcopy(model)
    res = trimformer.prune_(model, trimformer.build("search", {"target": "params=0.8", "widths": "0.5,0",
                                                                "multiple_of": 1}),
                            calibration=calib, progress=False).trimformer_history[-1]["result"]
    assert count_parameters(model) / n0 <= 0.8 + 1e-9
    assert res["choices"][1] == "removed"
    assert model.config.num_hidden_layers == len(anatomy_of(model).blocks)
    # the predicted error is the sum of the chosen options' measured errors; block 1 gone adds nothing to it
    errs = res["errors"]
    assert errs[1]["attn"] == pytest.approx(0.0, abs=1e-7) and errs[1]["0.0"] == pytest.approx(0.0, abs=1e-7)
    assert res["predicted_error"] == pytest.approx(sum(_option_error(c, e) for c, e in zip(res["choices"], errs)),
                                                   rel=1e-12, abs=1e-15)
    out = model.generate(calib[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)
    if all(c == "removed" or c == "attn+ffn1" for c in res["choices"]):
        assert _full_kl(model, ref, calib) == pytest.approx(0.0, abs=1e-6)


def test_asymmetric_refit_builds_the_same_architecture_closer_to_dense(calib):
    dense = _deeper(tiny("llama"), 4)
    cfg = {"target": "params=0.7", "widths": "0.5,0.25", "multiple_of": 1}
    out = {}
    for refit in ("plain", "asymmetric"):
        m = copy.deepcopy(dense)
        res = trimformer.prune_(m, trimformer.build("search", {**cfg, "refit": refit}), calibration=calib,
                                progress=False).trimformer_history[-1]["result"]
        out[refit] = (res["choices"], count_parameters(m), _full_kl(m, dense, calib))
    assert out["plain"][:2] == out["asymmetric"][:2]  # the same choice, the same shapes
    assert out["asymmetric"][2] < out["plain"][2]
    with pytest.raises(ValueError, match="refit"):
        trimformer.build("search", {"refit": "lsq"})


def test_latency_table_and_search_under_latency(calib):
    model = _deeper(tiny("llama"), 3)
    an = anatomy_of(model)
    opts = options([0.5, 0.0])
    t = latency_table(an, opts, tokens=32, runs=2)
    assert len(t["blocks"]) == 3 and t["blocks"][0] is t["blocks"][2]  # equal shapes measured once
    row = t["blocks"][0]
    assert row[opts[-1]] == 0.0 and all(v > 0 for o, v in row.items() if o.name != "removed")
    res = trimformer.prune_(model, trimformer.build("search", {"target": "latency=0.95", "widths": "0.5,0",
                                                                "tokens": 32, "runs": 2}),
                            calibration=calib, progress=False).trimformer_history[-1]["result"]
    assert res["predicted_latency"] <= 0.95 + 1e-9
    assert torch.isfinite(model(input_ids=calib).logits).all()


def test_a_saved_latency_table_drives_the_search_and_bad_ones_are_refused(calib, tmp_path):
    """Measured once and written; a table edited so that removing block 1's MLP is the one cheap option makes
    that the choice at a target only it can meet (each option's KL alone would not pick it)."""
    path = tmp_path / "table.json"
    spec = {"target": "latency=0.95", "widths": "0.5,0", "tokens": 32, "runs": 2, "latency_table": str(path),
            "kv_groups": "none", "query_heads": "none"}
    first = trimformer.prune_(_deeper(tiny("llama"), 3), trimformer.build("search", spec), calibration=calib,
                              progress=False).trimformer_history[-1]["result"]
    saved = json.loads(path.read_text())
    assert len(saved["blocks"]) == 3 and first["latency_table"]["dense_s"] == saved["dense_s"]
    assert set(saved["blocks"][0]) == {o.name for o in options([0.5, 0.0])}
    again = trimformer.prune_(_deeper(tiny("llama"), 3), trimformer.build("search", spec), calibration=calib,
                              progress=False).trimformer_history[-1]["result"]
    assert again["choices"] == first["choices"] and again["predicted_latency"] == first["predicted_latency"]

    full = saved["blocks"][0]["attn+ffn1"]
    saved["blocks"] = [{name: full for name in row} for row in saved["blocks"]]  # nothing saves time...
    saved["blocks"][1]["attn+ffn0"] = 0.0  # ...but dropping block 1's MLP, which saves a third of the blocks
    saved["fixed_s"], saved["dense_s"] = 0.0, 3 * full
    path.write_text(json.dumps(saved))
    res = trimformer.prune_(_deeper(tiny("llama"), 3), trimformer.build("search", {**spec, "target": "latency=0.7"}),
                            calibration=calib, progress=False).trimformer_history[-1]["result"]
    assert res["choices"] == ["attn+ffn1", "attn+ffn0", "attn+ffn1"]
    assert res["predicted_latency"] == pytest.approx(2 / 3)

    del saved["blocks"][2]["attn+ffn0.5"]
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"block 2 has no time for option\(s\) attn\+ffn0.5.*delete it to measure it again"):
        trimformer.prune_(_deeper(tiny("llama"), 3), trimformer.build("search", spec), calibration=calib, progress=False)
    path.write_text("{}")
    with pytest.raises(ValueError, match="latency table .*table.json: no 'blocks' entry"):
        trimformer.prune_(_deeper(tiny("llama"), 3), trimformer.build("search", spec), calibration=calib, progress=False)


def test_search_clear_errors(calib):
    with pytest.raises(ValueError, match="latency=R or params=R"):
        trimformer.build("search", {"target": "flops=0.5"})
    with pytest.raises(ValueError, match="widths"):
        trimformer.build("search", {"widths": "0.5,1.5"})
    with pytest.raises(ValueError, match="pre-norm decoders"):
        trimformer.prune_(tiny("bert"), trimformer.build("search", {}), calibration=calib, progress=False)
    with pytest.raises(BudgetError):  # the tiny model's embeddings alone exceed 10 % of its params
        trimformer.prune_(tiny("llama"), trimformer.build("search", {"target": "params=0.1"}), calibration=calib,
                          progress=False)


def test_width_measured_allocation_meets_target_and_spares_the_loud_block(calib):
    model = _deeper(tiny("llama"), 4)
    with torch.no_grad():
        anatomy_of(model).blocks[2].mlp.down.weight.mul_(8)  # cutting block 2's FFN now costs the most
    n0 = count_parameters(model)
    res = trimformer.prune_(model, trimformer.build("width", {"target": "params=0.85", "allocation": "measured",
                                                               "shares": "0.75,0.5,0.25", "precision": "fp32"}),
                            calibration=calib, progress=False).trimformer_history[-1]["result"]
    assert count_parameters(model) / n0 <= 0.85 + 1e-9
    assert res["ffn"][2] == max(res["ffn"]) and len(set(res["ffn"])) > 1
    with pytest.raises(ValueError, match="parts=ffn"):
        trimformer.build("width", {"allocation": "measured", "parts": "ffn,heads"})


def test_search_library_file_is_reused_only_for_the_same_model(calib, tmp_path, monkeypatch):
    from trimformer.structure import search as S

    dense = _deeper(tiny("llama"), 4)
    lib = str(tmp_path / "library.pt")
    settings = {"widths": "0.5,0", "multiple_of": 1, "library": lib}
    first = copy.deepcopy(dense)
    r1 = trimformer.prune_(first, trimformer.build("search", {"target": "params=0.8", **settings}),
                           calibration=calib, progress=False).trimformer_history[-1]["result"]
    assert os.path.exists(lib) and not [f for f in os.listdir(tmp_path) if ".tmp" in f]

    def no_scoring(*a, **k):
        raise AssertionError("the library was scored again")

    monkeypatch.setattr(S, "score_library", no_scoring)
    again = copy.deepcopy(dense)  # same model, another budget: loaded, and the same scores as before
    r2 = trimformer.prune_(again, trimformer.build("search", {"target": "params=0.7", **settings}),
                           calibration=calib, progress=False).trimformer_history[-1]["result"]
    assert r2["errors"] == r1["errors"]
    changed = copy.deepcopy(dense)
    with torch.no_grad():
        anatomy_of(changed).blocks[2].mlp.down.weight[0, 0] += 1e-3
    with pytest.raises(AssertionError, match="scored again"):  # other weights: the file is stale
        trimformer.prune_(changed, trimformer.build("search", {"target": "params=0.8", **settings}),
                          calibration=calib, progress=False)
    with pytest.raises(AssertionError, match="scored again"):  # other windows too
        trimformer.prune_(copy.deepcopy(dense), trimformer.build("search", {"target": "params=0.8", **settings}),
                          calibration=calib[:2], progress=False)


def test_search_for_vllm_offers_no_head_cuts_and_exports_to_deci(calib, tmp_path):
    """engine=vllm: the planted dead query heads are left (a per-block head count vLLM cannot build), the cut still
    meets its budget with FFN / sublayer options, and the result writes as DeciLM; engine=llamacpp takes them."""
    from trimformer.export.deci import save_deci
    from trimformer.export.gguf import save_gguf

    dense = _deeper(tiny("llama"), 4)
    an = anatomy_of(dense)
    a = an.blocks[2].attention
    with torch.no_grad():  # block 2: heads 0 and 3 (one per KV group) add nothing, as in the test above
        for b in an.blocks:
            b.attention.q.weight.mul_(8)
            b.attention.o.weight.mul_(8)
        a.o.weight[:, : a.head_dim] = 0
        a.o.weight[:, 3 * a.head_dim:] = 0
    n0 = count_parameters(dense)
    share = (n0 - (a.q.weight.numel() + a.o.weight.numel()) / 2) / n0 + 1e-7  # the dead heads' parameters
    cfg = {"target": f"params={share}", "widths": "", "kv_groups": "none", "precision": "fp32"}
    picks = {}
    for engine in ("vllm", "llamacpp"):
        model = copy.deepcopy(dense)
        res = trimformer.prune_(model, trimformer.build("search", {**cfg, "engine": engine}), calibration=calib,
                                progress=False).trimformer_history[-1]["result"]
        picks[engine] = res["choices"]
        assert count_parameters(model) <= share * n0
        heads = {b.attention.num_heads for b in anatomy_of(model).blocks if b.attention is not None}
        if engine == "vllm":
            assert heads == {4} and not any(re.search(r"-(kv|q)\d", c) for c in res["choices"])
            save_deci(model, tmp_path / "deci")
        else:
            save_gguf(model, tmp_path / "m.gguf", qtype="f32")
    assert picks["llamacpp"][2] == "attn-q1+ffn1"
    with pytest.raises(ValueError, match="engine vllm"):
        trimformer.build("search", {"engine": "vllm", "query_heads": "1"})
    with pytest.raises(ValueError, match="engine"):
        trimformer.build("search", {"engine": "sglang"})
