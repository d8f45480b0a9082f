"""The replacements a block is offered, what each one cuts, what it costs, and its KL score.

An `Option` keeps the attention (whole, with fewer KV groups, or with fewer query heads per group) or removes
it, and keeps a share of the FFN neurons (0: MLP removed; both gone: block removed). A narrower FFN keeps the
neurons of highest importance and re-fits down_proj by least squares (`ffn_cut`); a head cut keeps the
highest-scoring groups or query heads and re-fits o_proj (`head_cut`). `score_library` scores every cut of
every block by the model's KL to the dense one with only that change (probe.Probe); search and width's
measured allocation choose among them under a budget (budget.choose). Costs: parameters (`option_params`) or
the prefill latency of every option measured on this machine (`latency_table`).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import calibrate
from ..evaluate.speed import fastest
from ..io import atomic_file
from ..models import Anatomy, Attention, Block
from ..progress import bar
from . import surgery
from .importance import InputStats, least_squares, probe_stats, scores
from .probe import Probe, silenced, swapped

HeadKey = tuple[str, int]  # ('kv', groups kept) or ('q', query heads kept per group)


@dataclass(frozen=True)
class Option:
    """One replacement of a block: attention kept or not (kv: with only this many KV groups, 0 = all of them;
    q: with only this many query heads in every KV group, 0 = all of them), the share of FFN neurons kept
    (0: MLP removed)."""

    attn: bool
    ffn: float
    kv: int = 0
    q: int = 0

    @property
    def name(self) -> str:
        if not self.attn and self.ffn == 0:
            return "removed"
        a = "no-attn" if not self.attn else "attn" + (f"-kv{self.kv}" if self.kv else "") + (f"-q{self.q}" if self.q else "")
        return f"{a}+ffn{self.ffn:g}"

    def changes(self, block: Block) -> tuple[bool, bool]:
        """(attention changed, MLP changed) in `block` by this option."""
        return (block.attention is not None and (not self.attn or head_key(block, self) is not None),
                block.mlp is not None and self.ffn < 1)


def options(widths: list[float], attention: bool = True, kv: list[int] | tuple = (), q: list[int] | tuple = ()
            ) -> list[Option]:
    """Every attention variant (kept; with kv groups; with q query heads per group; removed) times every FFN share."""
    shares = sorted({1.0, *widths}, reverse=True)
    attn = [(True, 0, 0), *((True, k, 0) for k in sorted(set(kv), reverse=True)),
            *((True, 0, h) for h in sorted(set(q), reverse=True))] + ([(False, 0, 0)] if attention else [])
    return [Option(a, f, k, h) for a, k, h in attn for f in shares]


def head_key(block: Block, o: Option) -> HeadKey | None:
    """Which head cut option o makes in this block: ('kv', groups kept), ('q', query heads kept per group) or
    None (attention removed or kept whole: a count >= what the block has keeps it all)."""
    a = block.attention
    if not o.attn or a is None:
        return None
    if 0 < o.kv < a.num_kv_heads:
        return ("kv", o.kv)
    if 0 < o.q < a.num_heads // a.num_kv_heads:
        return ("q", o.q)
    return None


def keep_n(block: Block, share: float, multiple_of: int) -> int:
    """FFN neurons kept at `share`: rounded up to a multiple of `multiple_of`, at least one multiple."""
    n = block.mlp.intermediate_size
    return min(n, max(multiple_of, int(np.ceil(share * n / multiple_of)) * multiple_of))


# -- the cuts -----------------------------------------------------------------------------------
@dataclass
class FFNCut:
    """Neurons to keep in one block's FFN and the least-squares re-fit down_proj over them."""

    keep: torch.Tensor  # (k,) sorted neuron indices
    W: torch.Tensor  # (out, k)
    b: torch.Tensor | None

    def padded(self, n: int) -> torch.Tensor:
        """The (out, n) weight with the re-fit columns at `keep` and zeros elsewhere (same logits as the cut)."""
        W = self.W.new_zeros(self.W.shape[0], n)
        W[:, self.keep] = self.W
        return W


@dataclass
class HeadCut:
    """Query heads to keep in one block's attention (with the KV groups they use) and the re-fit o_proj over them."""

    heads: torch.Tensor  # (h,) sorted query heads kept
    cols: torch.Tensor  # (h * head_dim,) o_proj input columns kept
    W: torch.Tensor  # (out, h * head_dim)
    b: torch.Tensor | None

    def padded(self, n: int) -> torch.Tensor:
        W = self.W.new_zeros(self.W.shape[0], n)
        W[:, self.cols] = self.W
        return W


def _cols(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def head_indices(a: Attention, key: HeadKey) -> torch.Tensor:
    """The first heads a cut of this kind keeps (for timing: which ones does not matter)."""
    per = a.num_heads // a.num_kv_heads
    kind, n = key
    groups, each = (torch.arange(n), per) if kind == "kv" else (torch.arange(a.num_kv_heads), n)
    return (groups[:, None] * per + torch.arange(each)).flatten()


def head_cut(block: Block, key: HeadKey, st: InputStats, importance: str = "hessian") -> HeadCut:
    """('kv', g): keep the g KV groups whose query heads' o_proj columns score highest (scored as a whole);
    ('q', h): keep the h highest-scoring query heads of every KV group. o_proj is re-fitted by least squares."""
    a = block.attention
    per, kind, n = a.num_heads // a.num_kv_heads, *key
    if kind == "kv":
        groups = [_cols(g * per + torch.arange(per), a.head_dim) for g in range(a.num_kv_heads)]
        top = scores(importance, a.o, st, groups).topk(n).indices.sort().values
        heads = (top[:, None] * per + torch.arange(per)).flatten()
    else:
        sc = scores(importance, a.o, st, [_cols(torch.tensor([h]), a.head_dim) for h in range(a.num_heads)])
        top = sc.view(a.num_kv_heads, per).topk(n, dim=1).indices  # (groups, n) heads kept in each group
        heads = (top + torch.arange(a.num_kv_heads)[:, None] * per).flatten().sort().values
    cols = _cols(heads, a.head_dim)
    W, b = least_squares(a.o, cols, st, bias=a.o.bias is not None)
    return HeadCut(heads, cols, W, b)


def ffn_cut(block: Block, n: int, st: InputStats, importance: str = "hessian") -> FFNCut:
    """Keep the n FFN neurons whose down_proj columns score highest; down_proj re-fitted by least squares."""
    m = block.mlp
    groups = list(torch.arange(m.intermediate_size)[:, None])
    keep = scores(importance, m.down, st, groups).topk(n).indices.sort().values
    W, b = least_squares(m.down, keep, st, bias=m.down.bias is not None)
    return FFNCut(keep, W, b)


@torch.no_grad()
def score_library(anatomy: Anatomy, probe: Probe, shares: list[float], *, attention: bool = True,
                  importance: str = "hessian", multiple_of: int = 1, progress: bool = True, kv: tuple = (),
                  q: tuple = ()) -> tuple[list[dict[Any, float]], list[dict[Any, Any]]]:
    """Per block: {'attn': KL with attention removed, ('kv', k): KL with only k KV groups, ('q', h): KL with only
    h query heads per KV group, share: KL with the FFN cut to that share} (dense elsewhere), and the cuts that
    produced them. Share 0 silences the MLP; share 1 is the dense block (0)."""
    errors, cuts = [], []
    for block in bar(anatomy.blocks, desc="search: scoring options", unit="block", disable=not progress):
        i, err, cut = block.index, {1.0: 0.0}, {}
        a = block.attention
        if attention and a is not None:
            with silenced(block, "attn"):
                err["attn"] = probe.kl_from(i)
        keys = [] if a is None else sorted({k for o in options([], False, kv, q) if (k := head_key(block, o))},
                                           reverse=True)
        if keys:
            st = probe_stats(probe, block, a.o)
            for key in keys:
                c = cut[key] = head_cut(block, key, st, importance)
                with swapped(a.o, c.padded(a.o.in_features), c.b):
                    err[key] = probe.kl_from(i)
        if block.mlp is not None:
            st = probe_stats(probe, block)
            for f in sorted(set(shares) - {1.0}):
                if f == 0:
                    with silenced(block, "mlp"):
                        err[0.0] = probe.kl_from(i)
                    continue
                c = ffn_cut(block, keep_n(block, f, multiple_of), st, importance)
                cut[f] = c
                with swapped(block.mlp.down, c.padded(block.mlp.intermediate_size), c.b):
                    err[f] = probe.kl_from(i)
        errors.append(err)
        cuts.append(cut)
    return errors, cuts


# -- costs --------------------------------------------------------------------------------------
def block_shape(block: Block) -> tuple:
    """What a block's latency depends on: its kind and the shapes of its projections (equal keys share a timing)."""
    return (block.kind, *((n, tuple(p.weight.shape)) for n, p in block.projections().items()))


# Latency tables measured in a serving engine rather than PyTorch eager (search --latency-from NAME): NAME -> a
# function (anatomy, opts, *, tokens, runs, multiple_of, threads, python, progress) -> table, as latency_table
# returns. The engine code lives above this layer (export writes the engine's files) and registers itself here.
ENGINE_LATENCY: dict[str, Callable[..., dict[str, Any]]] = {}


def engine_latency(name: str) -> Callable[..., dict[str, Any]]:
    if name not in ENGINE_LATENCY:
        raise ValueError(f"latency_from {name!r}: no engine timer registered under that name "
                         f"({', '.join(sorted(ENGINE_LATENCY)) or 'none'}; import trimformer.export first)")
    return ENGINE_LATENCY[name]


def option_params(block: Block, o: Option, multiple_of: int) -> float:
    """Parameters `block` keeps under option o (attention and MLP, with biases)."""
    a = sum(p.weight.numel() + (p.bias.numel() if p.bias is not None else 0)
            for p in block.attention.projections.values()) if block.attention is not None else 0
    key = head_key(block, o)
    if key and key[0] == "kv":  # q, k, v rows and o columns all shrink with the groups (query heads per group fixed)
        a = a * o.kv / block.attention.num_kv_heads
    elif key:  # fewer query heads per group: q rows and o columns shrink, k and v stay
        at = block.attention
        qo = sum(p.weight.numel() + (p.bias.numel() if p.bias is not None else 0) for p in (at.q, at.o) if p is not None)
        if at.q is None:  # fused qkv: the q share of it
            qo = at.o.weight.numel() + at.qkv.weight.numel() * at.num_heads / (at.num_heads + 2 * at.num_kv_heads)
        a = a - qo * (1 - o.q / (at.num_heads // at.num_kv_heads))
    m = block.mlp
    if m is None or o.ffn == 0:
        f = 0
    else:
        rows = [p for p in (m.up, m.gate) if p is not None]
        per = sum(p.in_features + (p.bias is not None) for p in rows) + m.down.out_features
        f = per * (keep_n(block, o.ffn, multiple_of) if o.ffn < 1 else m.intermediate_size)
    return float((a if o.attn else 0) + f)


def take_option(anatomy: Anatomy, block: Block, o: Option, multiple_of: int) -> None:
    """Give `block` the shapes of option o, for timing: the first heads and neurons (which ones does not matter),
    FFN widths as the search builds them (`keep_n`)."""
    if key := head_key(block, o):
        surgery.prune_heads(block, head_indices(block.attention, key))
    if not o.attn and block.attention is not None:
        surgery.remove_attention(anatomy, block)
        block.attention = None
    if o.ffn < 1 and block.mlp is not None:
        if o.ffn == 0:
            surgery.remove_mlp(block)
        else:
            surgery.prune_neurons(block, torch.arange(keep_n(block, o.ffn, multiple_of)))


@torch.no_grad()
def latency_table(anatomy: Anatomy, opts: list[Option], *, tokens: int = 512, runs: int = 5,
                  multiple_of: int = 1) -> dict[str, Any]:
    """Prefill seconds (batch 1, `tokens` tokens, this machine, the model's dtype and threads) of every
    option of every block, and of everything outside the blocks (embedding, final norm, head); the dense
    model's time is their sum. Blocks of equal shape share one measurement; see `evaluate.speed.fastest`."""
    ids = torch.randint(0, anatomy.vocab_size or 2, (1, tokens), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = calibrate.capture_inputs(anatomy, ids.to(next(anatomy.model.parameters()).device))
    x, kw = inputs[0], kwargs[0]
    keys, variants = [], {}  # shape key of each block; per distinct key, (option, module) to time
    kws = {}  # per key, the forward arguments of that kind of block
    for block in anatomy.blocks:
        key = block_shape(block)
        keys.append(key)
        if key in variants:
            continue
        variants[key] = []
        kws[key] = calibrate.for_block(kw, block)
        for o in opts:
            if not o.attn and o.ffn == 0:
                continue
            b = copy.deepcopy(block)  # Block, module and projections copied together
            take_option(anatomy, b, o, multiple_of)
            variants[key].append((o, b.module))
    an = anatomy

    def outside() -> None:  # everything but the blocks: embedding, final norm, head
        an.embed(ids)
        an.head(an.final_norm(x) if an.final_norm is not None else x)

    jobs = [(key, o, m) for key, vs in variants.items() for o, m in vs]
    # the parts are timed as short calls alike: a whole-model call is long enough that a busy machine
    # always slows it, which would inflate what the blocks' budget must leave for the rest
    times = fastest([lambda m=m, k=k: m(x, **kws[k]) for k, _, m in jobs] + [outside], runs)
    rows: dict[tuple, dict[Option, float]] = {key: {o: 0.0 for o in opts} for key in variants}  # removed: 0
    for (key, o, _), t in zip(jobs, times):
        rows[key][o] = t
    per_block = [rows[key] for key in keys]
    fixed = times[-1]
    full = Option(True, 1.0)
    return {"dense_s": fixed + sum(r[full] for r in per_block), "fixed_s": fixed, "blocks": per_block}


def saved_latency_table(path: str, anatomy: Anatomy, opts: list[Option], measure: Any,
                        source: str = "torch") -> dict[str, Any]:
    """The latency table in the JSON file at `path` when there is one, else `measure()`'s, written there (when a
    path is given). A saved table makes a latency-targeted search repeatable on a busy machine (the choice then
    depends on the calibration only) and lets a table measured elsewhere drive it; it must name every offered
    option of every block. `source`: where the times come from ('torch', or an engine such as 'llamacpp'); a
    saved table records it (none recorded: torch) and is refused for another source."""
    if path and os.path.exists(path):
        try:
            t = json.loads(open(path, encoding="utf-8").read())
            rows = t["blocks"]
            if len(rows) != len(anatomy.blocks):
                raise ValueError(f"it has {len(rows)} blocks, the model {len(anatomy.blocks)}")
            for i, r in enumerate(rows):
                if missing := sorted({o.name for o in opts} - set(r)):
                    raise ValueError(f"block {i} has no time for option(s) {', '.join(missing)}")
            table = {"dense_s": float(t["dense_s"]), "fixed_s": float(t["fixed_s"]),
                     "blocks": [{o: float(r[o.name]) for o in opts} for r in rows]}
        except (ValueError, KeyError, TypeError) as e:
            why = f"no {e} entry" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"latency table {path}: {why} (not a table of this model and these options?); "
                             "delete it to measure it again") from None
        if (got := t.get("source", "torch")) != source:
            raise ValueError(f"latency table {path} was measured in {got}, the search asks for {source}: pass "
                             f"--latency-from {got}, or another --latency-table file to measure one in {source}")
        return table
    table = measure()
    if path:
        atomic_file(path, json.dumps({"source": source, "dense_s": table["dense_s"], "fixed_s": table["fixed_s"],
                                      "blocks": [{o.name: t for o, t in row.items()} for row in table["blocks"]]},
                                     indent=1))
    return table
