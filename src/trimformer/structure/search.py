"""Puzzle-style choice of one candidate per block under a budget, as a mixed-integer program.

Each block i has candidates j (keep, narrower FFN, fewer KV groups, attention removed, block removed), each with an error e_ij (e.g. its one-block KL on calibration data) and a cost c_ij (measured
latency, memory or parameters). `choose` solves

    minimise sum_ij e_ij x_ij  s.t.  sum_j x_ij = 1 for every block,  sum_ij c_ij x_ij <= budget,  x binary

with `scipy.optimize.milp`. `Search` builds the library for pre-norm decoders: per block, attention
kept, kept with fewer KV groups (whole groups and their query heads removed, o_proj re-fitted) or removed,
times the FFN kept at several widths (0 = MLP removed; both gone = block removed).
Errors: the KL to the dense model with only that change (probe.Probe, re-running the blocks from the
changed one); attention and FFN errors add (Puzzle scores each block's replacement alone the same way).
A narrower FFN keeps the neurons of highest importance and re-fits down_proj by least squares.
Costs: parameters, or the prefill latency of every option measured on this machine (`latency_table`).
With refit='asymmetric' (default) the chosen architecture is then built block by block against the dense
model's stream (calibrate.blocks(dense_targets=True)): in each block, o_proj (attention kept) and down_proj
(MLP kept, cut or not) are re-fitted by least squares so the block's output matches the *dense* block's
output, which also corrects what the blocks before it changed (width.py's asymmetric refit).
"""

from __future__ import annotations

import copy
import functools
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import calibrate
from ..models import Anatomy, Block, count_parameters
from ..progress import bar
from ..steps import StepContext
from . import STRUCTURE, surgery
from .depth import silenced
from .importance import IMPORTANCE, InputStats, least_squares, scores
from .probe import Probe, swapped
from .width import assign, output_error_stats


@dataclass(frozen=True)
class Candidate:
    name: str
    error: float
    cost: float


class BudgetTooSmallError(ValueError):
    pass


def choose(library: list[list[Candidate]], budget: float) -> list[int]:
    """Index of the chosen candidate for every block; a clear error when no choice fits the budget."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if not library or any(not c for c in library):
        raise ValueError("every block needs at least one candidate")
    cheapest = sum(min(c.cost for c in cands) for cands in library)
    if cheapest > budget + 1e-12:
        raise BudgetTooSmallError(
            f"budget {budget:g} is below the cheapest possible architecture ({cheapest:g}); raise the budget"
        )
    sizes = [len(c) for c in library]
    n = sum(sizes)
    err = np.array([c.error for cands in library for c in cands])
    cost = np.array([c.cost for cands in library for c in cands])
    one = np.zeros((len(library), n))  # (blocks, candidates): exactly one per block
    start = 0
    for i, k in enumerate(sizes):
        one[i, start:start + k] = 1
        start += k
    res = milp(
        c=err,
        constraints=[LinearConstraint(one, 1, 1), LinearConstraint(cost[None], -np.inf, budget)],
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
    )
    if not res.success:
        raise BudgetTooSmallError(f"no architecture fits budget {budget:g}: {res.message}")
    x = np.round(res.x).astype(int)
    out, start = [], 0
    for k in sizes:
        out.append(int(np.argmax(x[start:start + k])))
        start += k
    return out


# -- the candidate library ----------------------------------------------------------------------
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


def options(widths: list[float], attention: bool = True, kv: list[int] | tuple = (), q: list[int] | tuple = ()
            ) -> list[Option]:
    """Every attention variant (kept; with kv groups; with q query heads per group; removed) times every FFN share."""
    shares = sorted({1.0, *widths}, reverse=True)
    attn = [(True, 0, 0), *((True, k, 0) for k in sorted(set(kv), reverse=True)),
            *((True, 0, h) for h in sorted(set(q), reverse=True))] + ([(False, 0, 0)] if attention else [])
    return [Option(a, f, k, h) for a, k, h in attn for f in shares]


def _head_key(block: Block, o: Option) -> tuple[str, int] | None:
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


def _head_indices(a, key: tuple[str, int]) -> torch.Tensor:
    """The first heads a cut of this kind keeps (for timing: which ones does not matter)."""
    per = a.num_heads // a.num_kv_heads
    kind, n = key
    groups, each = (torch.arange(n), per) if kind == "kv" else (torch.arange(a.num_kv_heads), n)
    return (groups[:, None] * per + torch.arange(each)).flatten()


def head_cut(block: Block, key: tuple[str, int], st: InputStats, importance: str = "hessian") -> HeadCut:
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


def ffn_cut(block: Block, keep_n: int, st: InputStats, importance: str = "hessian") -> FFNCut:
    m = block.mlp
    groups = list(torch.arange(m.intermediate_size)[:, None])
    keep = scores(importance, m.down, st, groups).topk(keep_n).indices.sort().values
    W, b = least_squares(m.down, keep, st, bias=m.down.bias is not None)
    return FFNCut(keep, W, b)


@torch.no_grad()
def down_stats(probe: Probe, block: Block, proj: Any = None) -> InputStats:
    """Input statistics of the block's down_proj (or `proj`) on the probe's cached inputs of that block."""
    st = InputStats()
    p = proj if proj is not None else block.mlp.down
    h = p.module.register_forward_hook(lambda _m, a, _o: st.add(a[0]))
    try:
        probe._run(block, probe.block_inputs(block.index))
    finally:
        h.remove()
    return st


def _keep_n(block: Block, share: float, multiple_of: int) -> int:
    n = block.mlp.intermediate_size
    return min(n, max(multiple_of, int(np.ceil(share * n / multiple_of)) * multiple_of))


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
        keys = [] if a is None else sorted({k for o in options([], False, kv, q) if (k := _head_key(block, o))},
                                           reverse=True)
        if keys:
            st = down_stats(probe, block, a.o)
            for key in keys:
                c = cut[key] = head_cut(block, key, st, importance)
                with swapped(a.o, c.padded(a.o.in_features), c.b):
                    err[key] = probe.kl_from(i)
        if block.mlp is not None:
            st = down_stats(probe, block)
            for f in sorted(set(shares) - {1.0}):
                if f == 0:
                    with silenced(block, "mlp"):
                        err[0.0] = probe.kl_from(i)
                    continue
                c = ffn_cut(block, _keep_n(block, f, multiple_of), st, importance)
                cut[f] = c
                with swapped(block.mlp.down, c.padded(block.mlp.intermediate_size), c.b):
                    err[f] = probe.kl_from(i)
        errors.append(err)
        cuts.append(cut)
    return errors, cuts


# -- costs --------------------------------------------------------------------------------------
def _fastest(fns: list, runs: int) -> list[float]:
    """The fastest of `runs` timings of each fn, taken in interleaved rounds (every fn once per round) after one
    warm-up each. Other work on the machine only ever adds time, so the minimum is the least disturbed estimate,
    and interleaving makes a slow phase hit every option alike (a per-option median on a busy machine ranked a
    smaller block slower than a bigger one)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(runs):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


@torch.no_grad()
def latency_table(anatomy: Anatomy, opts: list[Option], *, tokens: int = 512, runs: int = 5,
                  multiple_of: int = 1) -> dict[str, Any]:
    """Prefill seconds (batch 1, `tokens` tokens, this machine, the model's dtype and threads) of every
    option of every block, and of everything outside the blocks (embedding, final norm, head); the dense
    model's time is their sum. Blocks of equal shape share one measurement; see `_fastest`."""
    ids = torch.randint(0, anatomy.vocab_size or 2, (1, tokens), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = calibrate.capture_inputs(anatomy, ids.to(next(anatomy.model.parameters()).device))
    x, kw = inputs[0], kwargs[0]
    keys, variants = [], {}  # shape key of each block; per distinct key, (option, module) to time
    kws = {}  # per key, the forward arguments of that kind of block
    for block in anatomy.blocks:
        key = (block.kind, *((n, tuple(p.weight.shape)) for n, p in block.projections().items()))
        keys.append(key)
        if key in variants:
            continue
        variants[key] = []
        kws[key] = calibrate.for_block(kw, block)
        for o in opts:
            if not o.attn and o.ffn == 0:
                continue
            b = copy.deepcopy(block)  # Block, module and projections copied together
            if key_ := _head_key(b, o):
                surgery.prune_heads(b, _head_indices(b.attention, key_))
            if not o.attn and b.attention is not None:
                surgery.remove_attention(anatomy, b)
                b.attention = None
            if o.ffn < 1 and b.mlp is not None:
                if o.ffn == 0:
                    surgery.remove_mlp(b)
                else:
                    surgery.prune_neurons(b, torch.arange(_keep_n(b, o.ffn, multiple_of)))
            variants[key].append((o, b.module))
    an = anatomy

    def outside() -> None:  # everything but the blocks: embedding, final norm, head
        an.embed(ids)
        an.head(an.final_norm(x) if an.final_norm is not None else x)

    jobs = [(key, o, m) for key, vs in variants.items() for o, m in vs]
    # the parts are timed as short calls alike: a whole-model call is long enough that a busy machine
    # always slows it, which would inflate what the blocks' budget must leave for the rest
    times = _fastest([lambda m=m, k=k: m(x, **kws[k]) for k, _, m in jobs] + [outside], runs)
    rows: dict[tuple, dict[Option, float]] = {key: {o: 0.0 for o in opts} for key in variants}  # removed: 0
    for (key, o, _), t in zip(jobs, times):
        rows[key][o] = t
    per_block = [rows[key] for key in keys]
    fixed = times[-1]
    full = Option(True, 1.0)
    return {"dense_s": fixed + sum(r[full] for r in per_block), "fixed_s": fixed, "blocks": per_block}


def _params(block: Block, o: Option, multiple_of: int) -> float:
    a = sum(p.weight.numel() + (p.bias.numel() if p.bias is not None else 0)
            for p in block.attention.projections.values()) if block.attention is not None else 0
    key = _head_key(block, o)
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
        f = per * (_keep_n(block, o.ffn, multiple_of) if o.ffn < 1 else m.intermediate_size)
    return float((a if o.attn else 0) + f)


def parse_budget(text: str) -> tuple[str, float]:
    kind, _, value = str(text).partition("=")
    if kind.strip() not in ("latency", "params") or not value:
        raise ValueError(f"target {text!r}: write latency=R or params=R, R the share of the dense model to keep")
    r = float(value)
    if not 0.0 < r <= 1.0:
        raise ValueError(f"target {text!r}: the share to keep must be in (0, 1], got {r}")
    return kind.strip(), r


def _library_key(anatomy: Anatomy, windows: torch.Tensor, settings: tuple) -> str:
    """A fingerprint of what the scored library depends on: the weights, the calibration windows, the settings."""
    import hashlib

    h = hashlib.sha256(repr(settings).encode())
    h.update(windows.cpu().numpy().tobytes())
    for name, p in anatomy.model.state_dict().items():  # exact sums in fp64: any changed weight shows
        d = p.double()  # one fp64 copy per tensor, read twice
        h.update(f"{name}{tuple(p.shape)}{d.sum().item():.17g}{d.abs().sum().item():.17g}".encode())
    return h.hexdigest()


def _load_library(path: str, key: str) -> tuple[list, list] | None:
    if not path or not os.path.exists(path):
        return None
    saved = torch.load(path, weights_only=False)
    return (saved["errors"], saved["cuts"]) if saved.get("key") == key else None


def _save_library(path: str, key: str, errors: list, cuts: list) -> None:
    """Written to a temporary file first, then renamed: an interrupted save leaves no half-written library."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"key": key, "errors": errors, "cuts": cuts}, tmp)
    os.replace(tmp, path)


def _counts(name: str, spec: Any, n: int) -> tuple[int, ...]:
    """Counts offered from a spec: 'auto' (every smaller count when n <= 4, else 3/4, 1/2 and 1/4 of n),
    '' or 'none' (nothing), or comma-separated counts >= 1; a clear error on anything else."""
    spec = str(spec).strip()
    if spec in ("", "none"):
        return ()
    if spec == "auto":
        return tuple(range(n - 1, 0, -1)) if n <= 4 else tuple(sorted({3 * n // 4, n // 2, max(1, n // 4)}, reverse=True))
    try:
        counts = tuple(int(k) for k in spec.split(",") if k.strip())
    except ValueError:
        counts = (0,)
    if not counts or min(counts) < 1:
        raise ValueError(f"{name} {spec!r}: 'auto', 'none' or comma-separated counts >= 1, e.g. 2,1")
    return counts


@STRUCTURE.register("search")
@dataclass
class Search:
    """Puzzle-style per-block choice under a budget. target: 'latency=R' (prefill latency measured on this
    machine, `tokens` tokens, median of `runs`) or 'params=R'. widths: FFN shares offered besides 1
    (0 = MLP removed). attention: also offer attention removal. windows/length: calibration tokens of
    the KL scores (positions: evenly spaced positions per window the KL is averaged over, 0 = all).
    importance: neuron criterion of the FFN cuts and KV-group criterion (least-squares re-fit always).
    kv_groups: KV-group counts offered for attention ('auto': every smaller count up to 4 groups, else 3/4,
    1/2 and 1/4 of them; '' or 'none': never). query_heads: query heads per KV group offered, all groups kept
    (same 'auto' rule over the heads of one group; '' or 'none': never).
    library: a file that keeps the scored library (errors and cuts); a later search of the same model, windows
    and library settings at another budget loads it instead of scoring again (a stale file is re-scored).
    refit: 'asymmetric' builds the choice block by block, re-fitting o/down to the dense model's block outputs
    on all calibration windows; 'plain' applies the cuts with their one-block least-squares re-fits only."""

    target: str = "latency=0.6"
    widths: str = "0.75,0.5,0.25,0"
    attention: bool = True
    windows: int = 16
    length: int = 256
    importance: str = "hessian"
    multiple_of: int = 8
    tokens: int = 512
    runs: int = 5
    precision: str = "auto"
    positions: int = 0
    refit: str = "asymmetric"
    kv_groups: str = "auto"
    query_heads: str = "auto"
    library: str = ""
    _kind: str = field(default="latency", init=False, repr=False)
    _keep: float = field(default=0.6, init=False, repr=False)

    def __post_init__(self) -> None:
        self._kind, self._keep = parse_budget(self.target)
        try:
            self._shares = [float(w) for w in str(self.widths).split(",") if w.strip()]
        except ValueError:
            raise ValueError(f"widths {self.widths!r}: comma-separated FFN shares in [0, 1), e.g. 0.75,0.5,0") from None
        if not all(0.0 <= w < 1.0 for w in self._shares):
            raise ValueError(f"widths {self.widths!r}: every share must be in [0, 1)")
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance {self.importance!r}: choose one of {', '.join(sorted(IMPORTANCE))}")
        if self.windows < 1 or self.length < 2 or self.multiple_of < 1 or self.runs < 1:
            raise ValueError("windows, multiple_of, runs must be >= 1 and length >= 2")
        for name in ("kv_groups", "query_heads"):
            _counts(name, getattr(self, name), 1)  # raises on a bad spec
        if self.refit not in ("asymmetric", "plain"):
            raise ValueError(f"refit {self.refit!r}: choose 'asymmetric' or 'plain'")
        calibrate.resolve_precision(self.precision)

    def _head_counts(self, anatomy: Anatomy) -> tuple[tuple[int, ...], tuple[int, ...]]:
        att = [b.attention for b in anatomy.blocks if b.attention is not None]
        groups = max((a.num_kv_heads for a in att), default=1)
        per = max((a.num_heads // a.num_kv_heads for a in att), default=1)
        return _counts("kv_groups", self.kv_groups, groups), _counts("query_heads", self.query_heads, per)

    needs_calibration = True
    needs_dense = False

    def apply_(self, anatomy: Anatomy, run: StepContext) -> dict[str, Any]:
        calibration, batch_size, progress = run.calibration, run.batch_size, run.progress
        if calibration is None:
            raise ValueError("search needs calibration windows (its options are scored by KL on them)")
        if not anatomy.causal or not all(b.pre_norm for b in anatomy.blocks):
            raise ValueError("search replaces sublayers of pre-norm decoders only")
        kv, q = self._head_counts(anatomy)
        opts = options(self._shares, self.attention, kv, q)
        if self._kind == "latency":
            table = latency_table(anatomy, opts, tokens=self.tokens, runs=self.runs, multiple_of=self.multiple_of)
            costs = [[row[o] for o in opts] for row in table["blocks"]]
            whole, fixed = table["dense_s"], table["fixed_s"]
        else:
            table = None
            costs = [[_params(b, o, self.multiple_of) for o in opts] for b in anatomy.blocks]
            whole = float(count_parameters(anatomy.model))
            fixed = whole - sum(c[0] for c in costs)
        budget = self._keep * whole - fixed
        if budget < 0:
            raise BudgetTooSmallError(f"target {self.target}: everything outside the blocks already costs "
                                      f"{fixed / whole:.2f} of the dense model; raise the target")
        windows = calibration[: self.windows, : self.length]
        key = _library_key(anatomy, windows, (sorted({o.ffn for o in opts}), self.attention, self.importance,
                                              self.multiple_of, kv, q, self.precision, self.positions))
        cached = _load_library(self.library, key)
        if cached is not None:
            errors, cuts = cached
        else:
            probe = Probe(anatomy, windows, batch_size=batch_size, precision=self.precision, positions=self.positions)
            errors, cuts = score_library(anatomy, probe, [o.ffn for o in opts], attention=self.attention,
                                         importance=self.importance, multiple_of=self.multiple_of, progress=progress,
                                         kv=kv, q=q)
            del probe
            if self.library:
                _save_library(self.library, key, errors, cuts)

        def attn_error(b: Block, o: Option, e: dict) -> float:
            return e.get("attn", 0.0) if not o.attn else e.get(_head_key(b, o), 0.0)

        # a KL is >= 0: a negative score is rounding noise around "no change" (the MIP would chase it)
        lib = [[Candidate(o.name, max(0.0, attn_error(b, o, e)) + max(0.0, e.get(o.ffn, 0.0)), c) for o, c in zip(opts, cs)]
               for b, e, cs in zip(anatomy.blocks, errors, costs)]
        pick = choose(lib, budget)
        chosen = [opts[j] for j in pick]
        predicted = (fixed + sum(lib[i][j].cost for i, j in enumerate(pick))) / whole
        _apply(anatomy, chosen, cuts, calibration if self.refit == "asymmetric" else None, batch_size=batch_size,
               precision=self.precision, progress=progress)
        return {"choices": [o.name for o in chosen], "predicted_" + self._kind: predicted,
                "predicted_error": sum(lib[i][j].error for i, j in enumerate(pick)),
                "latency_table": None if table is None else {
                    "dense_s": table["dense_s"], "fixed_s": table["fixed_s"],
                    "block0": {o.name: t for o, t in table["blocks"][0].items()}},
                "errors": [{str(k): v for k, v in e.items()} for e in errors]}


@torch.no_grad()
def _apply(anatomy: Anatomy, chosen: list[Option], cuts: list[dict[Any, Any]], calibration: torch.Tensor | None = None,
           *, batch_size: int = 1, precision: str = "auto", progress: bool = False) -> None:
    """Carry out the chosen options block by block (KV-group and FFN cuts, sublayer removals), then drop the
    blocks left empty. Without calibration the cuts keep their one-block least-squares re-fits; with it, each
    block is built against the dense stream: o (attention kept) and down (MLP kept, cut or not) are re-fitted so
    the block's output matches the dense block's (output_error_stats of the block as it is at that point)."""
    if calibration is None:
        steps = ((b, None) for b in anatomy.blocks)
    else:
        steps = ((bc.block, functools.partial(output_error_stats, bc))
                 for bc in calibrate.blocks(anatomy, calibration, batch_size=batch_size, progress=progress,
                                            precision=precision, desc="search: building", dense_targets=True))
    empty = []
    for block, stats in steps:
        o, cut = chosen[block.index], cuts[block.index]
        a, m = block.attention, block.mlp
        if a is not None and not o.attn:
            surgery.remove_attention(anatomy, block)  # the module is swapped: later runs skip it
        elif a is not None:
            c = cut[key] if (key := _head_key(block, o)) else None
            new = (c.W, c.b) if c is not None else None
            if stats is not None:
                cols = c.cols if c is not None else torch.arange(a.o.in_features)
                new = least_squares(a.o, cols, stats(a.o), bias=a.o.bias is not None)
            if c is not None:
                surgery.prune_heads(block, c.heads)
            assign(a.o, new)
        if m is not None and o.ffn == 0:
            surgery.remove_mlp(block)
        elif m is not None:
            c = cut[o.ffn] if o.ffn < 1 else None
            new = (c.W, c.b) if c is not None else None
            if stats is not None:  # after this block's attention changed
                keep = c.keep if c is not None else torch.arange(m.intermediate_size)
                new = least_squares(m.down, keep, stats(m.down), bias=m.down.bias is not None)
            if c is not None:
                surgery.prune_neurons(block, c.keep)
            assign(m.down, new)
        if not o.attn and (o.ffn == 0 or m is None):
            empty.append(block.index)
    if empty:
        surgery.remove_blocks(anatomy, empty)
    from ..models import anatomy_of

    surgery.sync_config(anatomy_of(anatomy.model))
