"""What one FFN neuron, head unit or hidden channel costs in measured latency: the cost of `width target=latency=R`.

NViT allocates a ViT's widths by importance per unit of latency, not per parameter: a projection's time is not
proportional to its width (kernel tiles, the fixed cost of each call, attention's T^2 part at long sequences, and
at batch 1 the weights' memory traffic). Here each distinct block shape is timed on this machine at several
widths of each part (the other parts whole), at the batch and sequence length the cut is for; the least-squares
slope of time against width is what one unit of that part saves in that block. Hidden channels run through every
block and the head: the whole model is timed at full and reduced width. The model's latency is then dense time
minus the units removed times their slopes, a linear model the allocation spends against (`UnitLatency.model`);
after the cut the model is timed again and its measured share is reported beside the modelled one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import calibrate
from ..evaluate.speed import fastest
from ..models import Anatomy, Block, anatomy_of
from ..progress import bar
from . import channels, surgery
from .costs import block_widths, head_slots, head_unit
from .options import block_shape

SHARES = (1.0, 0.75, 0.5, 0.25)  # widths each part is timed at (shares of its full width)


@dataclass
class UnitLatency:
    """Seconds saved per unit removed, per block (neuron_s, slot_s: per head unit) and for the model (channel_s),
    at the widths they were measured from (ffn0, slots0, hidden0); dense_s: the whole model's time."""

    dense_s: float
    neuron_s: list[float]
    slot_s: list[float]
    channel_s: float
    ffn0: list[int]
    slots0: list[int]
    hidden0: int
    batch: int
    tokens: int
    timed: dict[str, list] = field(default_factory=dict)  # 'model' / 'block N' (first of its shape) -> [(part, width, s)]

    def model(self, anatomy: Anatomy) -> float:
        """The modelled seconds of `anatomy` (a width cut of the measured model: same blocks, narrower parts)."""
        ffn, slots = block_widths(anatomy)
        gone = sum((a - b) * c for a, b, c in zip(self.ffn0, ffn, self.neuron_s)) + \
            sum((a - b) * c for a, b, c in zip(self.slots0, slots, self.slot_s))
        return self.dense_s - gone - (self.hidden0 - anatomy.hidden_size) * self.channel_s

    def record(self) -> dict:
        return {"dense_s": self.dense_s, "batch": self.batch, "tokens": self.tokens, "neuron_s": self.neuron_s,
                "slot_s": self.slot_s, "channel_s": self.channel_s, "timed": self.timed}


FLOOR = 1e-12  # seconds: the cost of a unit whose removal saves no measurable time (the allocation takes it last)


def slope(xs: list[float], ts: list[float]) -> float:
    """Least-squares seconds per unit of width through the points (width, seconds), at least FLOOR (a time that
    falls as width grows is noise; a cost <= 0 would make removing the unit look free)."""
    n = len(xs)
    mx, mt = sum(xs) / n, sum(ts) / n
    var = sum((x - mx) ** 2 for x in xs)
    return max(FLOOR, sum((x - mx) * (t - mt) for x, t in zip(xs, ts)) / var) if var else FLOOR


def widths(full: int, shares: tuple[float, ...] = SHARES) -> list[int]:
    """The distinct widths timed for a part of `full` units: each share of it, at least 1."""
    return sorted({max(1, round(full * s)) for s in shares}, reverse=True)


def _variants(block: Block, parts: list[str]) -> list[tuple[str, int, torch.nn.Module]]:
    """(part, width, module): copies of `block` with only that part narrowed (the first units: which ones does
    not change the time)."""
    out = []
    m, a = block.mlp, block.attention
    if "ffn" in parts and m is not None and m.intermediate_size > 1:
        for n in widths(m.intermediate_size)[1:]:
            b = copy.deepcopy(block)
            surgery.prune_neurons(b, torch.arange(n))
            out.append(("ffn", n, b.module))
    if "heads" in parts and a is not None:
        u = head_unit(a)
        slots = head_slots(a)
        for k in widths(slots)[1:]:
            b = copy.deepcopy(block)
            surgery.prune_heads(b, (torch.arange(u)[:, None] * slots + torch.arange(k)).flatten())
            out.append(("heads", k, b.module))
    return out


def _copies(sample: torch.Tensor, batch: int) -> torch.Tensor:
    """`batch` copies of the first input of `sample`: the batch every timing runs."""
    return sample[:1].expand(batch, *sample.shape[1:]).contiguous()


@torch.no_grad()
def measure(anatomy: Anatomy, sample: torch.Tensor, parts: list[str], *, batch: int = 1, runs: int = 5,
            progress: bool = False) -> UnitLatency:
    """Time `anatomy` and its parts at `batch` copies of `sample` (one calibration input: a token window or an
    image), `runs` interleaved runs each, fastest kept (evaluate.speed.fastest); see the module docstring."""
    if batch < 1 or runs < 1:
        raise ValueError(f"latency timing needs batch >= 1 and runs >= 1, got batch={batch}, runs={runs}")
    x0 = _copies(sample, batch)
    inputs, kwargs = calibrate.capture_inputs(anatomy, x0, batch_size=batch)  # one batch of `batch` copies
    x, kw = inputs[0], kwargs[0]
    model_kw = calibrate.model_inputs(anatomy, x0)
    model = anatomy.model
    jobs: list[tuple[tuple, str, int, Callable[[], object]]] = [((), "model", 0, lambda: model(**model_kw))]
    keys, seen = [], set()
    for block in anatomy.blocks:
        key = block_shape(block)
        keys.append(key)
        if key in seen:
            continue
        seen.add(key)
        bkw = calibrate.for_block(kw, block)
        full = [("ffn", block.mlp.intermediate_size if block.mlp else 0, block.module)]
        for part, n, mod in full + _variants(block, parts):
            jobs.append((key, part, n, lambda m=mod, k=bkw: m(x, **k)))
    times = fastest([j[-1] for j in jobs], runs)
    hidden = []  # (width, seconds): the whole model with fewer hidden channels, timed beside the dense one
    if "hidden" in parts:
        for w in bar(widths(anatomy.hidden_size, (0.75, 0.5)), desc="width: timing hidden widths", unit="width",
                     disable=not progress):
            narrow = copy.deepcopy(model)  # one narrow copy at a time: a big model is not held three times
            channels.prune_channels(anatomy_of(narrow), torch.arange(w))
            kw_n = calibrate.model_inputs(anatomy_of(narrow), x0)
            t_dense, t_w = fastest([jobs[0][-1], lambda m=narrow, k=kw_n: m(**k)], runs)
            times[0] = min(times[0], t_dense)
            hidden.append((w, t_w))
            del narrow
    timed: dict[tuple, list[tuple[str, int, float]]] = {}
    for (key, part, n, _), t in zip(jobs, times):
        timed.setdefault(key, []).append((part, n, t))
    dense_s = timed[()][0][2]

    def per_unit(key: tuple, part: str, full: int) -> float:
        pts = [(full, timed[key][0][2])] + [(n, t) for p, n, t in timed[key][1:] if p == part]
        return slope([float(n) for n, _ in pts], [t for _, t in pts]) if len(pts) > 1 else 0.0

    neuron, slot = [], []
    for block, key in zip(anatomy.blocks, keys):
        m, a = block.mlp, block.attention
        neuron.append(per_unit(key, "ffn", m.intermediate_size) if m is not None else 0.0)
        slot.append(per_unit(key, "heads", head_slots(a)) if a is not None else 0.0)
    timed[()] += [("hidden", w, t) for w, t in hidden]
    chan = slope([float(anatomy.hidden_size), *(float(w) for w, _ in hidden)], [dense_s, *(t for _, t in hidden)]) \
        if hidden else 0.0
    ffn0, slots0 = block_widths(anatomy)
    return UnitLatency(
        dense_s=dense_s, neuron_s=neuron, slot_s=slot, channel_s=chan, ffn0=ffn0, slots0=slots0,
        hidden0=anatomy.hidden_size, batch=batch, tokens=int(x.shape[1]),
        timed={"model" if k == () else f"block {keys.index(k)}": v for k, v in timed.items()})


@torch.no_grad()
def measured_share(anatomy: Anatomy, sample: torch.Tensor, lat: UnitLatency, runs: int = 5) -> float:
    """The cut model's time at the measured batch, as a share of the dense time measured before the cut."""
    kw = calibrate.model_inputs(anatomy, _copies(sample, lat.batch))
    return fastest([lambda: anatomy.model(**kw)], runs)[0] / lat.dense_s
