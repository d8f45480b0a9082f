"""One budget vocabulary for every structured method, parsed once; typed configs from the strings users type."""

from __future__ import annotations

from typing import get_args

import pytest

import trimformer
from trimformer.config import ConfigError
from trimformer.methods import Recipe
from trimformer.structure.budget import Budget
from trimformer.structure.importance import IMPORTANCE, Criterion


@pytest.mark.parametrize("text,kind,value", [
    ("params=0.8", "params", 0.8), ("flops=0.85", "flops", 0.85), ("latency=0.6", "latency", 0.6),
    ("compute=0.2", "compute", 0.2), ("remove=6", "remove", 6), ("remove=0.25", "remove", 0.25),
    (" params = 1 ", "params", 1.0), ("remove=6.0", "remove", 6), ("compute=0", "compute", 0.0),
])
def test_parse_and_canonical_text(text, kind, value):
    b = Budget.parse(text)
    assert (b.kind, b.value) == (kind, value) and type(b.value) is type(value)
    assert Budget.parse(str(b)) == b and str(Budget.parse(str(b))) == str(b)


def test_the_text_keeps_every_digit():
    b = Budget.parse("params=0.8123456789012345")
    assert str(b) == "params=0.8123456789012345"


@pytest.mark.parametrize("text,match", [
    ("params", "KIND=VALUE"), ("speed=0.5", "KIND=VALUE"), ("params=x", "not a number"),
    ("params=1.5", r"in \(0, 1\]"), ("params=0", r"in \(0, 1\]"), ("latency=-0.1", r"in \(0, 1\]"),
    ("compute=1", r"in \[0, 1\)"), ("remove=2.5", "a count"), ("remove=-1", "a count"), ("flops=nan", "finite"),
])
def test_bad_budgets_are_clear_errors(text, match):
    with pytest.raises(ValueError, match=match):
        Budget.parse(text)


def test_remove_counts_or_shares():
    assert Budget.parse("remove=6").count(30, "blocks") == 6
    assert Budget.parse("remove=0.2").count(30, "blocks") == 6
    assert Budget.parse("remove=0").count(30, "blocks") == 0
    with pytest.raises(ValueError, match="rounds to none"):
        Budget.parse("remove=0.01").count(30, "blocks")
    with pytest.raises(ValueError, match="cannot remove 30 of 30 blocks"):
        Budget.parse("remove=30").count(30, "blocks")


def test_a_config_coerces_its_target_and_reports_the_field():
    assert trimformer.build("width", {"target": "flops=0.7"}).budget == Budget("flops", 0.7)
    with pytest.raises(ConfigError, match="target="):
        trimformer.build("width", {"target": "params=2"})


@pytest.mark.parametrize("name,settings,budget", [
    ("depth", {"remove": "6"}, "remove=6"),
    ("depth", {"share": "0.2"}, "remove=0.2"),
    ("depth", {"target": "remove=3"}, "remove=3"),
    ("finercut", {"compute": "0.2"}, "compute=0.2"),
    ("finercut", {"remove": 4}, "remove=4"),
    ("finercut", {"target": "compute=0.25"}, "compute=0.25"),
    ("width", {}, "params=0.8"),
    ("search", {}, "latency=0.6"),
])
def test_older_fields_spell_the_one_budget(name, settings, budget):
    assert str(trimformer.build(name, settings).budget) == budget


@pytest.mark.parametrize("name,settings,match", [
    ("depth", {}, "depth needs a budget: set remove or share"),
    ("depth", {"remove": 2, "target": "remove=1"}, "takes one budget"),
    ("depth", {"share": 1.0}, r"share in \[0, 1\)"),
    ("finercut", {"remove": 2, "compute": 0.2}, "takes one budget"),
    ("finercut", {}, "needs a budget"),
    ("finercut", {"compute": 1.2}, "compute=1.2"),
    ("depth", {"target": "params=0.8"}, "depth takes a budget remove=N"),
    ("finercut", {"target": "latency=0.5"}, "compute=S or remove=N"),
])
def test_budget_errors_name_the_fix(name, settings, match):
    with pytest.raises(ValueError, match=match):
        trimformer.build(name, settings)


def test_the_strings_users_type_today_still_build():
    """README's flags and recipe keys, as the CLI passes them (strings, through a recipe's --set overrides)."""
    cases = {
        "width": {"target": "params=0.8", "parts": "ffn,heads", "importance": "flap", "allocation": "measured",
                  "shares": "0.75,0.5", "multiple_of": "8", "sequential": "true", "asymmetric": "true"},
        "depth": {"remove": "6", "criterion": "angular", "fuse": "true"},
        "finercut": {"compute": "0.2", "parts": "attn,mlp", "rank": "kl", "blocks": "false", "refine": "2"},
        "search": {"target": "latency=0.6", "widths": "0.75,0.5,0", "kv_groups": "2,1", "query_heads": "none",
                   "refit": "plain", "library": "lib.pt"},
    }
    cases["width"]["parts"] = "ffn"  # measured allocation chooses FFN widths only
    built = {name: Recipe.one(name).override(s).build()[0] for name, s in cases.items()}
    w, d, f, s = built["width"], built["depth"], built["finercut"], built["search"]
    assert (w.parts, w.shares, w.multiple_of, w.sequential) == (["ffn"], [0.75, 0.5], 8, True)
    assert (d.remove, d.criterion, d.fuse) == (6, "angular", True)
    assert (f.parts, f.rank, f.blocks, f.refine) == (["attn", "mlp"], "kl", False, 2)
    assert (s.widths, s.kv_groups, s.query_heads) == ([0.75, 0.5, 0.0], [2, 1], "none")


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("none", "none"), ("", []), ("2,1", [2, 1]),
                                            (2, [2]), ([1], [1])])
def test_head_counts_accept_auto_none_or_counts(value, expected):
    assert trimformer.build("search", {"kv_groups": value}).kv_groups == expected


@pytest.mark.parametrize("field,value", [("kv_groups", "0"), ("query_heads", "x"), ("widths", "0.5,1.5"),
                                         ("parts", "ffn,experts"), ("refit", "lsq"), ("importance", "wanda")])
def test_bad_typed_values_name_their_field(field, value):
    name = "width" if field in ("parts", "importance") else "search"
    with pytest.raises(ValueError, match=field):
        trimformer.build(name, {field: value})


def test_widths_from_text_lists_or_nothing():
    assert trimformer.build("search", {"widths": "0.5"}).widths == [0.5]
    assert trimformer.build("search", {"widths": [0.5, 0]}).widths == [0.5, 0.0]
    assert trimformer.build("search", {"widths": ""}).widths == []


def test_the_criterion_type_lists_every_registered_criterion():
    assert set(get_args(Criterion)) == set(IMPORTANCE)
