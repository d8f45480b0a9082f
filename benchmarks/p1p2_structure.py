"""P1 + P2 (BENCHMARK.md) for structured pruning on smollm2-135m: trimformer vs Torch-Pruning 1.6.1.

    PYTHONPATH=src python benchmarks/p1p2_structure.py            # everything, sequentially
    PYTHONPATH=src python benchmarks/p1p2_structure.py --part width   # or depth; then --merge

Width: 20 % and 50 % fewer parameters, trimformer `width` vs Torch-Pruning (Taylor on FFN neurons,
its only usable mode on this GQA model; run in /work/peers/tp as a subprocess) at the same parameter
count. Depth: removing 20 % of the blocks' compute, FinerCut sublayers vs whole blocks by block
influence. Quality: ppl_doc, kl_doc / top-1 on the doc evaluation pool, and KL on a second domain
never used for calibration: Python standard-library source code (argparse, dataclasses, typing,
collections, email.message, http.client). Speed: prefill 1x512, dense and pruned alternately, median.
Window counts are below the protocol's 64 when the flags say so (the shared 2-core machine); the
result files record the counts used.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, environment, references, threads_arg, window_args, write_results

import trimformer
from trimformer import data
from trimformer.commands import parse_pairs
from trimformer.models import anatomy_of, count_parameters
from trimformer.models.load import cache_dir

TP_PYTHON = os.environ.get("TP_PYTHON", "/work/peers/tp/bin/python")


def flops_per_token(model, context: int = 512) -> float:
    """2 x matmul weights per token + attention scores/values at the mean causal context of a prefill."""
    an = anatomy_of(model)
    mat = sum(p.weight.numel() for _, p in an.projections()) + (an.head.weight.numel() if an.head is not None else 0)
    attn = sum(4 * b.attention.num_heads * b.attention.head_dim * (context / 2) for b in an.blocks if b.attention)
    return 2 * mat + attn


@torch.no_grad()
def prefill_ratio(model, dense, runs: int) -> dict[str, float]:
    ids = torch.randint(100, 10000, (1, 512), generator=torch.Generator().manual_seed(0))
    t = {"dense": [], "pruned": []}
    for m in (dense, model):  # warm-up
        m(input_ids=ids, use_cache=False)
    for _ in range(runs):
        for key, m in (("dense", dense), ("pruned", model)):
            t0 = time.perf_counter()
            m(input_ids=ids, use_cache=False)
            t[key].append(time.perf_counter() - t0)
    d, p = statistics.median(t["dense"]), statistics.median(t["pruned"])
    return {"prefill_dense_s": d, "prefill_pruned_s": p, "prefill_ratio": p / d}


def measure(name: str, model, dense, ctx: dict, seconds: float, extra: dict | None = None) -> dict:
    a = ctx["args"]
    row = {"name": name, "prune_seconds": seconds, "params": count_parameters(model),
           "flops_per_token": flops_per_token(model)}
    row["params_ratio"] = row["params"] / ctx["dense_params"]
    row["flops_ratio"] = row["flops_per_token"] / ctx["dense_flops"]
    row["ppl_doc"] = _ppl(model, ctx["ppl"])
    k = ctx["ref"]["doc"].score(model)
    row["kl_doc"], row["top1_doc"] = k["kl"], k["top1_agree"]
    row["kl_code"] = ctx["ref"]["code"].score(model)["kl"]
    if a.prefill_runs > 0:
        row.update(prefill_ratio(model, dense, a.prefill_runs))
    row.update(extra or {})
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return row


def _ppl(model, windows) -> float:
    from trimformer.evaluate.quality import perplexity

    return perplexity(model, windows, progress=False)


def run_tp(ratio: float, calib: torch.Tensor, workdir: Path) -> tuple[object, float]:
    cal = workdir / "tp_calib.pt"
    torch.save(calib, cal)
    out = workdir / f"tp_{ratio:.3f}"
    cmd = [TP_PYTHON, str(Path(__file__).parent / "tp_runner.py"), str(cache_dir("smollm2-135m")), str(cal),
           str(ratio), "ffn", str(out)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    seconds = json.loads((out / "timing.json").read_text())["seconds"]
    return trimformer.load(out), seconds


def tp_ratio_for(params_keep: float, dense) -> float:
    """FFN neuron ratio that removes the same parameters as `params_keep` (uniform over blocks)."""
    an = anatomy_of(dense)
    per_neuron = sum(3 * an.hidden_size for _ in an.blocks)  # gate row + up row + down column, every block
    need = count_parameters(dense) * (1 - params_keep)
    return need / per_neuron / an.blocks[0].mlp.intermediate_size


def width_part(dense, ctx) -> list[dict]:
    a = ctx["args"]
    rows = []
    for keep in a.keeps:
        for spec in a.width:
            if ":" in spec:  # 'KEEP:settings' applies to that target only
                only, spec = spec.split(":", 1)
                if abs(float(only) - keep) > 1e-9:
                    continue
            settings = dict(kv.split("=", 1) for kv in spec.split(",,")) if spec else {}
            settings = {"target": f"params={keep}", **settings}
            m = copy.deepcopy(dense)
            t0 = time.perf_counter()
            trimformer.prune_(m, trimformer.build("width", settings), calibration=ctx["calib"], progress=False)
            rows.append(measure(f"trimformer width {settings}", m, dense, ctx, time.perf_counter() - t0,
                                {"keep_target": keep, "tool": "trimformer"}))
            del m
        if not a.skip_tp:
            ratio = tp_ratio_for(keep, dense)
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    m, sec = run_tp(ratio, ctx["calib"][: a.tp_windows], Path(tmp))
                except subprocess.CalledProcessError as e:  # record the peer's failure, keep going
                    rows.append({"name": f"torch-pruning taylor ffn ratio={ratio:.3f}", "error": str(e),
                                 "keep_target": keep, "tool": "torch-pruning"})
                    continue
                rows.append(measure(f"torch-pruning taylor ffn ratio={ratio:.3f}", m, dense, ctx, sec,
                                    {"keep_target": keep, "tool": "torch-pruning"}))
                del m
    return rows


def depth_part(dense, ctx) -> list[dict]:
    """Block influence removes 20 % of the blocks; FinerCut removes the same share of the blocks' matmul
    compute (parameters) in sublayers, never more. Both are also scored by FinerCut's own calibration-side
    criterion (KL on its calibration windows), so a search failure and a criterion failure can be told apart."""
    from trimformer.config import settings
    from trimformer.structure.finercut import FinerCut
    from trimformer.structure.probe import Probe, silenced

    a = ctx["args"]
    rows = []
    L = len(anatomy_of(dense).blocks)
    n_blocks = round(0.2 * L)
    fc = {"compute": n_blocks / L, **{k: v for k, v in (("windows", a.finercut_windows), ("length", a.finercut_length),
          ("shortlist", a.finercut_shortlist), ("positions", a.finercut_positions), ("rank", a.finercut_rank),
          ("blocks", a.finercut_blocks), ("refine", a.finercut_refine)) if v is not None}}
    for fuse in a.depth_variants:
        fused = fuse == "fused"
        cfg = FinerCut(**fc, fuse=fused)
        tag = " fused" if fused else ""
        m = copy.deepcopy(dense)
        t0 = time.perf_counter()
        trimformer.prune_(m, trimformer.build("depth", {"remove": n_blocks, "criterion": "block-influence", "fuse": fused}),
                          calibration=ctx["calib"], progress=False)
        sec = time.perf_counter() - t0
        res = m.trimformer_history[-1]["result"]
        drop = res["removed_blocks"]
        bi_kl = None
        if not fused:  # FinerCut's criterion on the same removal (fusion changes weights: scored on eval only)
            an = anatomy_of(dense)
            probe = Probe(an, ctx["calib"][: cfg.windows, : cfg.length], precision=cfg.precision, positions=cfg.positions)
            with contextlib.ExitStack() as st:
                for i in drop:
                    for k in ("attn", "mlp"):
                        st.enter_context(silenced(an.blocks[i], k))
                bi_kl = probe.kl_from(0)
            del probe
        rows.append(measure(f"depth block-influence remove={n_blocks}{tag}", m, dense, ctx, sec,
                            {"removed": drop, "calib_kl": bi_kl, "fused": res.get("fused")}))
        m = copy.deepcopy(dense)
        t0 = time.perf_counter()
        trimformer.prune_(m, cfg, calibration=ctx["calib"], progress=True)
        res = m.trimformer_history[-1]["result"]
        rows.append(measure(f"finercut {fc}{tag}", m, dense, ctx, time.perf_counter() - t0,
                            {"removed": res["final"], "greedy": res["removed"], "swaps": res["swaps"],
                             "calib_kl": res["kl"], "greedy_calib_kl": res["greedy_kl"], "fused": res.get("fused"),
                             "compute_removed": res["compute_removed"], "config": settings(cfg)}))
    return rows


def search_part(dense, ctx) -> list[dict]:
    """search at each latency target, then uniform width cuts (FFN + heads) around it: the comparison is
    with the best uniform cut whose measured prefill ratio is not above the search's."""
    a = ctx["args"]
    rows = []
    lib = tempfile.TemporaryDirectory()  # every target reuses one scored library (scores do not depend on it)
    for lat in a.latencies:
        m = copy.deepcopy(dense)
        t0 = time.perf_counter()
        cfg = {"target": f"latency={lat}", **{k: v for k, v in (("windows", a.finercut_windows),
                                                                 ("length", a.finercut_length)) if v is not None},
               **parse_pairs(a.search_set, "--search-set")}
        cfg.setdefault("library", os.path.join(lib.name, "library.pt"))
        trimformer.prune_(m, trimformer.build("search", cfg), calibration=ctx["calib"], progress=True)
        res = m.trimformer_history[-1]["result"]
        name = {k: v for k, v in cfg.items() if k != "library"}
        rows.append(measure(f"search {name}", m, dense, ctx, time.perf_counter() - t0,
                            {"tool": "trimformer", "latency_target": lat, "choices": res["choices"],
                             "predicted_latency": res["predicted_latency"], "latency_table": res["latency_table"],
                             "library_scored_here": lat == a.latencies[0]}))
        del m
    for keep in a.uniform_keeps:
        m = copy.deepcopy(dense)
        t0 = time.perf_counter()
        cfg = {"target": f"params={keep}", "parts": "ffn,heads", "allocation": "uniform", "precision": "auto",
               "sequential": True, "asymmetric": True}  # the best uniform cut: same dense-target refit as search
        trimformer.prune_(m, trimformer.build("width", cfg), calibration=ctx["calib"], progress=False)
        rows.append(measure(f"uniform width {cfg}", m, dense, ctx, time.perf_counter() - t0,
                            {"tool": "trimformer", "uniform_for_search": True}))
        del m
    return rows


def to_markdown(res: dict) -> str:
    lines = ["# P1 + P2, structured pruning on smollm2-135m", "",
             f"Settings: {json.dumps(res['settings'])}", "",
             f"Dense: params {res['dense']['params']:,}, ppl_doc {res['dense']['ppl_doc']:.3f}", "",
             "| run | params ratio | FLOPs ratio | ppl_doc | kl_doc | top1_doc | kl_code | prefill ratio | prune s | eval windows ppl/kl (dense ppl) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['params_ratio']:.3f} | {r['flops_ratio']:.3f} | {r['ppl_doc']:.2f} | "
                     f"{r['kl_doc']:.3f} | {r['top1_doc']:.3f} | {r['kl_code']:.3f} | "
                     f"{r.get('prefill_ratio', float('nan')):.3f} | {r['prune_seconds']:.0f} | "
                     f"{r.get('eval_windows', '')} ({r.get('dense_ppl_doc', res['dense']['ppl_doc']):.2f}) |")
    depth = [r for r in res["rows"] if r.get("calib_kl") is not None]
    if depth:
        lines += ["", "Depth, scored by FinerCut's own calibration-side criterion (KL to the dense model on its "
                  "calibration windows): " + "; ".join(f"{r['name'].split(' {')[0]} {r['calib_kl']:.3f}" for r in depth)]
        for r in depth:
            if "greedy_calib_kl" in r:
                lines.append(f"FinerCut ({json.dumps(r['config'])}): greedy {r['greedy_calib_kl']:.3f}, after "
                             f"{len(r['swaps'])} swaps {r['calib_kl']:.3f}; compute removed {r['compute_removed']:.4f}; "
                             f"removed {', '.join(f'{i}.{k}' for i, k in r['removed'])}")
    for r in res["rows"]:
        if r.get("fused"):
            kept = [f for f in r["fused"] if f["kept"]]
            lines.append(f"{r['name']}: {len(kept)} of {len(r['fused'])} fusions kept (block -> dense state after "
                         f"the gap, calibration KL): " + ", ".join(f"{f['block']}.{f['proj']}->{f['target_block']} "
                                                                  f"{f['kl_before']:.3f}->{f['kl_after']:.3f}"
                                                                  for f in kept))
    searched = [r for r in res["rows"] if "latency_target" in r and "error" not in r]
    uniform = [r for r in res["rows"] if r.get("uniform_for_search") and "error" not in r]
    for r in searched:
        fits = [u for u in uniform if u["prefill_ratio"] <= r["prefill_ratio"]]
        lines += ["", f"Search at latency={r['latency_target']}: predicted {r['predicted_latency']:.3f}, measured "
                  f"prefill ratio {r['prefill_ratio']:.3f}, kl_doc {r['kl_doc']:.3f}; chosen per block: "
                  f"{', '.join(r['choices'])}"]
        if fits:
            best = min(fits, key=lambda u: u["kl_doc"])
            lines.append(f"Best uniform width cut with measured prefill ratio <= the search's: {best['name']} "
                         f"(ratio {best['prefill_ratio']:.3f}), kl_doc {best['kl_doc']:.3f}.")
        else:
            lines.append("No uniform width cut in this run is as fast as the search's result (see the rows).")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["all", "width", "depth", "search"], default="all")
    p.add_argument("--merge", action="store_true", help="merge the part files into p1p2_structure.json/.md")
    window_args(p, calib="--calib", ppl="--ppl-windows", kl="--kl-windows", code="--code-windows")
    p.add_argument("--prefill-runs", type=int, default=5)
    p.add_argument("--tp-windows", type=int, default=4, help="calibration windows for the peer's Taylor gradients")
    p.add_argument("--keeps", type=float, nargs="+", default=[0.8, 0.5])
    p.add_argument("--width", nargs="+", default=["0.8:parts=ffn,,allocation=uniform",
                                                  "0.5:parts=ffn,heads,,allocation=uniform"],
                   help="trimformer width settings per run: [KEEP:]key=value joined by ',,'")
    p.add_argument("--skip-tp", action="store_true")
    p.add_argument("--latencies", type=float, nargs="*", default=[0.6], help="search latency targets (none: only the uniform cuts)")
    p.add_argument("--depth-variants", nargs="+", choices=["plain", "fused"], default=["plain"],
                   help="depth part: plain removal and/or with the removed sublayers fused into their neighbours")
    p.add_argument("--search-set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="search config fields, e.g. windows=16 positions=0 query_heads=none")
    p.add_argument("--out-name", help="result file stem (default p1p2_structure[_PART]); p1p2_structure_* files are merged")
    p.add_argument("--uniform-keeps", type=float, nargs="*", default=[0.55, 0.6],
                   help="params targets of the uniform width cuts the search is compared with")
    p.add_argument("--finercut-windows", type=int, help="FinerCut's settings; unset: its defaults")
    p.add_argument("--finercut-length", type=int)
    p.add_argument("--finercut-shortlist", type=int)
    p.add_argument("--finercut-positions", type=int, help="scored positions per window (probe; 0 = all)")
    p.add_argument("--finercut-rank", help="kl | per-compute")
    p.add_argument("--finercut-blocks", type=lambda v: v.lower() in ("1", "true", "yes"), help="whole-block moves: true|false")
    p.add_argument("--finercut-refine", type=int, help="swap refinement rounds after the greedy")
    threads_arg(p, default=1)
    a = p.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if a.merge:
        parts = [json.loads(f.read_text()) for f in sorted(RESULTS.glob("p1p2_structure_*.json"))]
        for pp in parts:  # parts may differ in evaluation windows: each row says its count and its dense ppl
            for r in pp["rows"]:
                r.setdefault("eval_windows", f"{pp['settings']['ppl_windows']}/{pp['settings']['kl_windows']}")
                r.setdefault("dense_ppl_doc", pp["dense"]["ppl_doc"])
        res = {"settings": {f.stem: pp["settings"] for f, pp in zip(sorted(RESULTS.glob("p1p2_structure_*.json")), parts)},
               "dense": parts[0]["dense"],
               "rows": [r for pp in parts for r in pp["rows"]]}
        write_results(RESULTS / "p1p2_structure", res, to_markdown(res))
        print(to_markdown(res))
        return
    torch.set_num_threads(a.threads)
    dense, tok = trimformer.load("smollm2-135m", with_tokenizer=True)
    ctx = {"args": a, "calib": data.calibration_windows(tok, n=a.calib, length=512),
           "ppl": data.evaluation_windows(tok, n=a.ppl_windows, length=512),
           "dense_params": count_parameters(dense), "dense_flops": flops_per_token(dense),
           # fp16 log-probs (half the memory), as this benchmark has always kept them
           "ref": references(dense, tok, doc=a.kl_windows, code=a.code_windows, dtype=torch.float16)}
    dense_row = {"params": ctx["dense_params"], "flops_per_token": ctx["dense_flops"], "ppl_doc": _ppl(dense, ctx["ppl"])}
    print("dense", dense_row, flush=True)
    rows = []
    if a.part in ("all", "width"):
        rows += width_part(dense, ctx)
    if a.part in ("all", "depth"):
        rows += depth_part(dense, ctx)
    if a.part in ("all", "search"):
        rows += search_part(dense, ctx)
    settings = {k: v for k, v in vars(a).items() if k not in ("merge", "out_name")}
    settings.update(environment())
    res = {"part": a.part, "settings": settings, "dense": dense_row, "rows": rows}
    name = a.out_name or ("p1p2_structure" if a.part == "all" else f"p1p2_structure_{a.part}")
    write_results(RESULTS / name, res, to_markdown(res))
    print(to_markdown(res))


if __name__ == "__main__":
    main()
