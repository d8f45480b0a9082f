"""width target=latency=R: units priced by measured time (structure/latency.py), NViT's latency-aware allocation."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny

import trimformer
from trimformer.models import anatomy_of
from trimformer.structure import latency, surgery
from trimformer.structure.costs import head_unit
from trimformer.structure.latency import FLOOR, UnitLatency, slope, widths


def _images(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _priced(model, neuron: list[float], slot: list[float], channel: float = FLOOR, dense: float = 1.0) -> UnitLatency:
    an = anatomy_of(model)
    return UnitLatency(dense_s=dense, neuron_s=neuron, slot_s=slot, channel_s=channel,
                       ffn0=[b.mlp.intermediate_size for b in an.blocks],
                       slots0=[b.attention.num_heads // head_unit(b.attention) for b in an.blocks],
                       hidden0=an.hidden_size, batch=1, tokens=17)


def test_slope_is_the_least_squares_line_and_never_free():
    assert slope([4.0, 3.0, 2.0, 1.0], [9.0, 7.0, 5.0, 3.0]) == pytest.approx(2.0)
    assert slope([4.0, 2.0], [1.0, 2.0]) == FLOOR  # time falls as width grows: noise, not a negative cost
    assert slope([4.0, 4.0], [1.0, 2.0]) == FLOOR
    assert widths(8) == [8, 6, 4, 2] and widths(2) == [2, 1] and widths(1) == [1]


def test_modelled_latency_is_dense_minus_the_removed_units_at_their_prices():
    model = tiny("dinov2")
    an = anatomy_of(model)
    n = len(an.blocks)
    lat = _priced(model, [0.001 * (i + 1) for i in range(n)], [0.01] * n, channel=0.002, dense=2.0)
    b0 = an.blocks[0]
    surgery.prune_neurons(b0, torch.arange(b0.mlp.intermediate_size - 5))  # 5 neurons at 0.001 s
    a1 = an.blocks[1].attention
    surgery.prune_heads(an.blocks[1], torch.arange(a1.num_heads - 1))  # one head unit at 0.01 s
    assert lat.model(anatomy_of(model)) == pytest.approx(2.0 - 5 * 0.001 - 0.01)


def test_global_allocation_spends_the_latency_budget_where_time_is_cheapest(monkeypatch):
    """Block 0's neurons save 100x the time of any other unit: under latency=R the cut takes them first, where a
    parameter budget spreads by importance per parameter; the modelled latency lands on the target."""
    calib = _images()
    model = tiny("dinov2")
    n = len(anatomy_of(model).blocks)
    prices = _priced(model, [1e-2] + [1e-4] * (n - 1), [1e-4] * n)
    calls = []
    monkeypatch.setattr(latency, "measure", lambda *a, **k: calls.append(k) or prices)
    monkeypatch.setattr(latency, "measured_share", lambda an, sample, lat, runs: lat.model(an) / lat.dense_s)
    ffn0 = prices.ffn0[0]
    w = trimformer.build("width", {"parts": ["ffn", "heads"], "importance": "fisher", "allocation": "global",
                                   "target": "latency=0.8", "latency_batch": 3})
    trimformer.prune_(model, w, calibration=calib, batch_size=4, progress=False)
    res = model.trimformer_history[-1]["result"]
    an = anatomy_of(model)
    assert len(calls) == 1 and calls[0]["batch"] == 3
    assert res["latency_modelled"] == pytest.approx(prices.model(an) / prices.dense_s)
    assert res["latency_modelled"] <= 0.8 + 1e-9 and res["spent"] == res["latency_modelled"]
    # 0.2 s to save; block 0 holds ffn0 * 0.01 s: it alone pays (all of it but a few neurons)
    assert an.blocks[0].mlp.intermediate_size < ffn0
    assert all(b.mlp.intermediate_size == ffn0 for b in an.blocks[1:]) or ffn0 * 1e-2 < 0.2
    assert w._latency is None  # the prices were that model's: a second prune measures its own


def test_rounds_price_once_and_each_round_cuts_its_share_of_the_modelled_time(monkeypatch):
    model = tiny("dinov2")
    n = len(anatomy_of(model).blocks)
    prices = _priced(model, [1e-3] * n, [2e-3] * n)
    calls = []
    monkeypatch.setattr(latency, "measure", lambda *a, **k: calls.append(1) or prices)
    monkeypatch.setattr(latency, "measured_share", lambda an, sample, lat, runs: 0.5)
    removable = sum(prices.ffn0) * 1e-3 + sum(prices.slots0) * 2e-3
    w = trimformer.build("width", {"parts": ["ffn", "heads"], "importance": "fisher", "allocation": "global",
                                   "target": f"latency={1 - 0.3 * removable:.4f}", "rounds": 3})
    trimformer.prune_(model, w, calibration=_images(), batch_size=4, progress=False)
    res = model.trimformer_history[-1]["result"]
    assert calls == [1] and res["rounds"] == 3
    assert res["spent"] == 0.5  # the measured share, not the model's
    assert res["latency_modelled"] == pytest.approx(1 - 0.3 * removable, abs=2e-3)


@pytest.mark.parametrize("family", ["dinov2", "llama"])
def test_measure_times_every_part_of_a_real_model(family):
    model = tiny(family)
    an = anatomy_of(model)
    sample = _images(1) if family == "dinov2" else torch.randint(0, 100, (1, 24))
    lat = latency.measure(an, sample, ["ffn", "heads", "hidden"], batch=2, runs=1)
    n = len(an.blocks)
    assert lat.dense_s > 0 and lat.batch == 2 and lat.tokens == (17 if family == "dinov2" else 24)  # 4x4 patches + CLS
    assert len(lat.neuron_s) == len(lat.slot_s) == n
    assert min(lat.neuron_s + lat.slot_s + [lat.channel_s]) >= FLOOR
    parts = {p for rows in lat.timed.values() for p, _, _ in rows}
    assert parts == {"model", "ffn", "heads", "hidden"}
    assert lat.model(an) == lat.dense_s
    assert [b.mlp.intermediate_size for b in an.blocks] == lat.ffn0  # timing copies, never the model itself
    seen = []
    handle = an.blocks[0].module.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[0]))
    latency.measure(an, sample, ["ffn"], batch=3, runs=1)
    handle.remove()
    assert set(seen) == {3}  # blocks are timed at the batch asked, like the whole model


def test_bad_latency_settings_are_named():
    with pytest.raises(ValueError, match="latency_batch"):
        trimformer.build("width", {"target": "latency=0.8", "latency_batch": 0})
    with pytest.raises(ValueError, match="batch >= 1"):
        latency.measure(anatomy_of(tiny("dinov2")), _images(1), ["ffn"], batch=0)
