"""Puzzle-style search: one replacement per block, chosen under a budget by a mixed-integer program.

Every block is offered its options (options.py: attention kept, kept with fewer KV groups or query heads, or
removed, times the FFN kept at several widths; 0 = MLP removed, both gone = block removed). Each option is
scored by the model's KL to the dense one with only that change (attention and FFN errors add, as Puzzle
scores each block's replacement alone) and costs its parameters or its prefill latency measured on this
machine; `budget.choose` picks one per block. With refit='asymmetric' (default) the chosen architecture is
then built block by block against the dense model's stream (calibrate.blocks(dense_targets=True)): in each
block, o_proj (attention kept) and down_proj (MLP kept, cut or not) are re-fitted by least squares so the
block's output matches the *dense* block's output, which also corrects what the blocks before it changed
(width's asymmetric refit).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .. import calibrate
from ..models import Anatomy, Block, count_parameters
from ..steps import StepContext
from . import STRUCTURE, surgery
from .base import Precision, Scope, StructurePruner
from .budget import Budget, BudgetError, Candidate, cached_library, choose, library_key
from .importance import Criterion, least_squares, output_error_stats
from .options import (
    Option,
    engine_latency,
    head_key,
    latency_table,
    option_params,
    options,
    saved_latency_table,
    score_library,
)
from .probe import Probe

Counts = Literal["auto", "none"] | list[int] | int  # an int: one count (YAML `kv_groups: 1`)


def counts(spec: Counts, n: int) -> tuple[int, ...]:
    """Counts offered: 'auto' (every smaller count when n <= 4, else 3/4, 1/2 and 1/4 of n), 'none' or [] (nothing),
    or the given counts."""
    if spec == "none":
        return ()
    if spec == "auto":
        return tuple(range(n - 1, 0, -1)) if n <= 4 else tuple(sorted({3 * n // 4, n // 2, max(1, n // 4)}, reverse=True))
    return tuple(spec)


@STRUCTURE.register("search")
@dataclass
class Search(StructurePruner):
    """Puzzle-style per-block choice under a budget. target: 'latency=R' (prefill latency measured on this
    machine, `tokens` tokens, the fastest of `runs`) or 'params=R'. widths: FFN shares offered besides 1
    (0 = MLP removed). attention: also offer attention removal. windows/length: calibration tokens of
    the KL scores (positions: evenly spaced positions per window the KL is averaged over, 0 = all).
    importance: neuron criterion of the FFN cuts and KV-group criterion (least-squares re-fit always).
    kv_groups: KV-group counts offered for attention ('auto': every smaller count up to 4 groups, else 3/4,
    1/2 and 1/4 of them; 'none' or '': never; or counts, e.g. 2,1). query_heads: query heads per KV group
    offered, all groups kept (same 'auto' rule over the heads of one group; 'none' or '': never).
    library: a file that keeps the scored library (errors and cuts); a later search of the same model, windows
    and library settings at another budget loads it instead of scoring again (a stale file is re-scored).
    latency_table: a JSON file of the prefill latency table: read when it exists, else measured and written
    there. Measured at run time the table follows the machine's load; saved, a latency-targeted search gives
    the same choice on every run, and a table measured elsewhere (per block: option name -> seconds, plus
    dense_s and fixed_s) can drive it.
    refit: 'asymmetric' builds the choice block by block, re-fitting o/down to the dense model's block outputs
    on all calibration windows; 'plain' applies the cuts with their one-block least-squares re-fits only.
    engine: offer only what that serving engine runs from our export. 'vllm' (--format deci): DeciLM's
    num_attention_heads is global in vLLM, so no option changes a block's query heads (neither query heads per group
    nor KV groups, which take their query heads with them); FFN widths, attention and MLP removal stay (vLLM builds
    any width from block_configs' intermediate_size). 'llamacpp' (--format gguf, per-layer head counts) and 'hf'
    (our checkpoint): every option.
    latency_from: where the latency table is measured: 'torch' (PyTorch eager, one block at a time) or 'llamacpp'
    (whole-model GGUF prefills in llama.cpp, `engine_threads` threads, in a subprocess of `engine_python` or
    $TRIMFORMER_ENGINE_PYTHON, else this Python, which must have llama-cpp-python; see export.llamacpp_latency),
    so that a latency target holds when the cut is served there.
    filter_fn is asked about each attention and MLP sublayer: a rejected one is neither cut, removed nor re-fitted."""

    target: Budget = Budget("latency", 0.6)
    widths: list[float] = field(default_factory=lambda: [0.75, 0.5, 0.25, 0.0])
    attention: bool = True
    windows: int = 16
    length: int = 256
    importance: Criterion = "hessian"
    multiple_of: int = 8
    tokens: int = 512
    runs: int = 5
    precision: Precision = "auto"
    positions: int = 0
    refit: Literal["asymmetric", "plain"] = "asymmetric"
    kv_groups: Counts = "auto"
    query_heads: Counts = "auto"
    library: str = ""
    latency_table: str = ""
    engine: Literal["hf", "vllm", "llamacpp"] = "hf"
    latency_from: Literal["torch", "llamacpp"] = "torch"
    engine_python: str = ""
    engine_threads: int = 1

    budgets = ("latency", "params")
    filter_on = ("attn", "mlp")
    decoders_only = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not all(0.0 <= w < 1.0 for w in self.widths):
            raise ValueError(f"widths {self.widths}: every FFN share must be in [0, 1), e.g. 0.75,0.5,0")
        if self.windows < 1 or self.length < 2 or self.multiple_of < 1 or self.runs < 1 or self.engine_threads < 1:
            raise ValueError("windows, multiple_of, runs, engine_threads must be >= 1 and length >= 2")
        for name in ("kv_groups", "query_heads"):
            spec = getattr(self, name)
            if isinstance(spec, int):
                spec = [spec]
                setattr(self, name, spec)
            if isinstance(spec, list) and any(k < 1 for k in spec):
                raise ValueError(f"{name} {spec}: 'auto', 'none' or counts >= 1, e.g. 2,1")
            if self.engine == "vllm":
                if isinstance(spec, list) and spec:
                    raise ValueError(f"{name} {spec} with engine vllm: vLLM keeps the query heads of every block equal "
                                     "(DeciLM's num_attention_heads is global), so head cuts per block cannot be served "
                                     "there; drop the counts, or search with engine llamacpp (GGUF holds them)")
                setattr(self, name, "none")

    def _head_counts(self, anatomy: Anatomy) -> tuple[tuple[int, ...], tuple[int, ...]]:
        att = [b.attention for b in anatomy.blocks if b.attention is not None]
        groups = max((a.num_kv_heads for a in att), default=1)
        per = max((a.num_heads // a.num_kv_heads for a in att), default=1)
        return counts(self.kv_groups, groups), counts(self.query_heads, per)

    def prune(self, anatomy: Anatomy, run: StepContext, scope: Scope) -> dict[str, Any]:
        calibration, batch_size, progress = run.calibration, run.batch_size, run.progress
        kv, q = self._head_counts(anatomy)
        opts = options(self.widths, self.attention, kv, q)
        kind = self.budget.kind
        if kind == "latency":
            def measure() -> dict[str, Any]:
                if self.latency_from == "torch":
                    return latency_table(anatomy, opts, tokens=self.tokens, runs=self.runs, multiple_of=self.multiple_of)
                return engine_latency(self.latency_from)(
                    anatomy, opts, tokens=self.tokens, runs=self.runs, multiple_of=self.multiple_of,
                    threads=self.engine_threads, python=self.engine_python, progress=progress)

            table = saved_latency_table(self.latency_table, anatomy, opts, measure, source=self.latency_from)
            costs = [[row[o] for o in opts] for row in table["blocks"]]
            whole, fixed = table["dense_s"], table["fixed_s"]
        else:
            table = None
            costs = [[option_params(b, o, self.multiple_of) for o in opts] for b in anatomy.blocks]
            whole = float(count_parameters(anatomy.model))
            fixed = whole - sum(c[0] for c in costs)
        budget = self.budget.keep * whole - fixed
        if budget < 0:
            raise BudgetError(f"target {self.target}: everything outside the blocks already costs "
                              f"{fixed / whole:.2f} of the dense model; raise the target")
        windows = calibration[: self.windows, : self.length]
        key = library_key(anatomy, windows, (sorted({o.ffn for o in opts}), self.attention, self.importance,
                                             self.multiple_of, kv, q, self.precision, self.positions))

        def score() -> tuple[list, list]:
            probe = Probe(anatomy, windows, batch_size=batch_size, precision=self.precision, positions=self.positions)
            return score_library(anatomy, probe, [o.ffn for o in opts], attention=self.attention,
                                 importance=self.importance, multiple_of=self.multiple_of, progress=progress, kv=kv, q=q)

        errors, cuts = cached_library(self.library, key, score)

        def attn_error(b: Block, o: Option, e: dict) -> float:
            return e.get("attn", 0.0) if not o.attn else e.get(head_key(b, o), 0.0)

        def offered(b: Block, o: Option) -> bool:  # filter_fn: a rejected sublayer stays as it is
            attn, mlp = o.changes(b)
            return not (attn and not scope(b.index, "attn")) and not (mlp and not scope(b.index, "mlp"))

        # a KL is >= 0: a negative score is rounding noise around "no change" (the MIP would chase it)
        lib = [[Candidate(o.name, max(0.0, attn_error(b, o, e)) + max(0.0, e.get(o.ffn, 0.0)), c) for o, c in zip(opts, cs)]
               for b, e, cs in zip(anatomy.blocks, errors, costs)]
        index = [[j for j, o in enumerate(opts) if offered(b, o)] for b in anatomy.blocks]
        pick = [idx[j] for idx, j in zip(index, choose([[row[j] for j in idx] for row, idx in zip(lib, index)], budget))]
        chosen = [opts[j] for j in pick]
        predicted = (fixed + sum(lib[i][j].cost for i, j in enumerate(pick))) / whole
        _build(anatomy, chosen, cuts, calibration if self.refit == "asymmetric" else None, scope, batch_size=batch_size,
               precision=self.precision, progress=progress)
        return {"choices": [o.name for o in chosen], "predicted_" + kind: predicted,
                "predicted_error": sum(lib[i][j].error for i, j in enumerate(pick)),
                "latency_table": None if table is None else {
                    "dense_s": table["dense_s"], "fixed_s": table["fixed_s"],
                    "block0": {o.name: t for o, t in table["blocks"][0].items()}},
                "errors": [{str(k): v for k, v in e.items()} for e in errors],
                **({"spent": predicted} if kind == "latency" else {})}


@torch.no_grad()
def _build(anatomy: Anatomy, chosen: list[Option], cuts: list[dict[Any, Any]], calibration: torch.Tensor | None,
           scope: Scope, *, batch_size: int = 1, precision: str = "auto", progress: bool = False) -> None:
    """Carry out the chosen options block by block (KV-group and FFN cuts, sublayer removals), then drop the
    blocks left empty. Without calibration the cuts keep their one-block least-squares re-fits; with it, each
    block is built against the dense stream: o (attention kept) and down (MLP kept, cut or not) are re-fitted so
    the block's output matches the dense block's (output_error_stats of the block as it is at that point), unless
    filter_fn rejected that sublayer."""
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
            c = cut[key] if (key := head_key(block, o)) else None
            new = (c.W, c.b) if c is not None else None
            if stats is not None and scope(block.index, "attn"):
                cols = c.cols if c is not None else torch.arange(a.o.in_features)
                new = least_squares(a.o, cols, stats(a.o), bias=a.o.bias is not None)
            if c is not None:
                surgery.prune_heads(block, c.heads)
            surgery.assign(a.o, new)
        if m is not None and o.ffn == 0:
            surgery.remove_mlp(block)
        elif m is not None:
            c = cut[o.ffn] if o.ffn < 1 else None
            new = (c.W, c.b) if c is not None else None
            if stats is not None and scope(block.index, "mlp"):  # after this block's attention changed
                keep = c.keep if c is not None else torch.arange(m.intermediate_size)
                new = least_squares(m.down, keep, stats(m.down), bias=m.down.bias is not None)
            if c is not None:
                surgery.prune_neurons(block, c.keep)
            surgery.assign(m.down, new)
        if not o.attn and (o.ffn == 0 or m is None):
            empty.append(block.index)
    if empty:
        surgery.remove_blocks(anatomy, empty)
