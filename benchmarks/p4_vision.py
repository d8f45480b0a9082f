"""BENCHMARK.md P4-vision: training-free token methods on dinov2-s, dense side by side in one run.

Views: K seeded random crops / scales / flips (224 px) of each bundled image (data/images.py); a view's
matches are the other views of its source. Quality: recall@1 and mAP of same-source retrieval with the
[CLS] and the mean-pooled patch features, and their cosine to the dense model's (mean, 5th percentile).
Every method restores full length after the last block (ToMe-style copy), so mean pooling sees every
patch. Cost: block FLOPs ratio (scoring included; the patch embedding, ~2.5 % of the model, is left
out), and latency ratios at batch 1 and 32: medians over alternating dense / pruned runs, so load from
other processes hits both alike. Run it under the shared lock (BENCHMARK.md), quote only the ratios:

    flock /work/heavy.lock nice -n 5 env PYTHONPATH=src python benchmarks/p4_vision.py
    PYTHONPATH=src python benchmarks/p4_vision.py --views 4 --only merge --flops 0.6    # quick

The quality pass is deterministic and needs no lock: `--part quality` writes it to OUT.quality.json, and
`--part timing` (under the lock) adds the latencies to those rows, running each method as the quality pass
did (acc's speedup rows reuse the schedule solved there).

`--part structure` adds NViT-style width cuts (heads and MLP neurons, global Fisher importance of the output
features, FLOPs-aware allocation) beside a uniform cut, each training-free and after feature distillation from
the dense model (recover/features.py) on *other* random views of the same sources (seed + 1; no labels), each
exported, reloaded by vanilla transformers in a process without trimformer and compared; `--part weights`
adds 2:4 weight cuts (SparseGPT, Wanda: quality only; a 2:4 pattern runs no faster on CPU). Both add their
rows to the saved OUT.json (run the token parts first):

    flock /work/heavy.lock nice -n 5 env PYTHONPATH=src python benchmarks/p4_vision.py --part structure
    flock /work/heavy.lock nice -n 5 env PYTHONPATH=src python benchmarks/p4_vision.py --part weights
    flock /work/heavy.lock nice -n 5 env PYTHONPATH=src python benchmarks/p4_vision.py --part eet --flops 0.6 0.5

`--part eet` scores EET-style stage-by-stage pruning (tokens/eet.py) training-free and after the teacher transfer
(the model trained inside the pruning towards the dense features, same views as the structure part) at equal FLOPs.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import out_arg, threads_arg  # benchmarks/ is on sys.path when run as a script
from p4_vision_tables import check_targets, runs_of, write

import trimformer
from trimformer import tokens
from trimformer.data.images import ViewConfig, retrieval_views
from trimformer.evaluate.retrieval import feature_cosine, image_features, retrieval_metrics

FLOPS = (0.6, 0.5, 0.8)  # the targets' budgets first


def settings_at(f: float) -> list[tuple[str, dict]]:
    """Each training-free method at a FLOPs share f; acc at the speedup 1/f, its schedule solved from
    latencies measured at batch 32 (the FLOPs it lands at are reported); merge on hidden states at 0.6."""
    return [
        ("merge", {"flops": f}),  # ToMe: keys
        *([("merge", {"flops": f, "features": "hidden"})] if f == 0.6 else []),
        ("transform", {"flops": f}),
        ("zero-tprune", {"flops": f}),
        ("acc", {"speedup": round(1 / f, 3), "measure_tokens": 257, "measure_batch": 32}),
        ("coverage", {"flops": f, "mass": 0.99}),  # the schedule is a floor; rows keep more when attention is spread
    ]


@torch.no_grad()
def latency_ratio(model, method, batches: list[torch.Tensor], reps: int, pruned=None) -> tuple[float, float]:
    """(median pruned / dense ratio, median dense seconds) over alternating runs of each batch; the pruned run
    is `model` inside the token `method`, or the model `pruned` (method None)."""
    ratios, dense_s = [], []
    for _ in range(reps):
        for px in batches:
            t0 = time.perf_counter()
            model(pixel_values=px)
            dense = time.perf_counter() - t0
            with tokens.prune(model, method) if method is not None else torch.no_grad():
                t0 = time.perf_counter()
                (pruned or model)(pixel_values=px)
                ratios.append((time.perf_counter() - t0) / dense)
            dense_s.append(dense)
    return statistics.median(ratios), statistics.median(dense_s)


def quality(feats: dict[str, torch.Tensor], labels: torch.Tensor, dense: dict[str, torch.Tensor] | None) -> dict:
    out = {}
    for kind, f in feats.items():
        out[kind] = retrieval_metrics(f, labels)
        if dense is not None:
            out[kind].update(feature_cosine(f, dense[kind]))
    return out


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = trimformer.load("dinov2-s")
    px, labels = retrieval_views(ViewConfig(views=args.views, seed=args.seed))
    cache = Path(args.out).with_suffix(".quality.json")
    if args.part in ("structure", "weights", "eet"):  # rows added to the saved run
        saved = Path(args.out).with_suffix(".json")
        if not saved.is_file():
            raise SystemExit(f"--part {args.part} adds rows to {saved}: run the token parts first")
        result = json.loads(saved.read_text())
        if (result["views"], result["seed"]) != (args.views, args.seed):
            raise SystemExit(f"{saved} has views={result['views']} seed={result['seed']}; pass the same")
        dense = image_features(model, px, args.batch)
        part = {"structure": structure_pass, "weights": weights_pass, "eet": eet_pass}[args.part]
        key = "structure_holdout" if args.part == "structure" and args.holdout else args.part
        command = "PYTHONPATH=src python benchmarks/p4_vision.py " + shlex.join(sys.argv[1:])
        rows, before = part(model, px, labels, dense, args), result.get(key)
        runs = [f"`{command}` {args.where}; {args.threads} thread(s)"]
        kept = kept_rows(before, rows, args) if before else []
        if kept:  # rows this run did not redo stay, with the runs that made them
            rows = rows[:1] + kept + rows[1:] if args.part == "eet" else kept + rows
            runs = runs_of(before) + runs
        result[key] = {"rows": rows, "where": args.where, "threads": args.threads, "train_views": args.train_views,
                       "command": command, "runs": runs}
        if args.part in ("structure", "eet"):
            result[key]["reps"] = args.reps
        if args.holdout or args.part == "eet":
            result[key]["dense_held_out"] = quality_on(dense, labels, dense, held_out(labels))
        return result
    if args.part == "timing":
        if not cache.is_file():
            raise SystemExit(f"--part timing needs {cache}: run --part quality first")
        result = json.loads(cache.read_text())
        if (result["views"], result["seed"]) != (args.views, args.seed):
            raise SystemExit(f"{cache} has views={result['views']} seed={result['seed']}; pass the same")
    else:
        result = quality_pass(model, px, labels, args)
        if args.part == "quality":
            cache.write_text(json.dumps(result, indent=2))
            return result
    one, b32 = timing_batches(px, args)
    for r in result["rows"][1:]:
        if "error" in r:
            continue
        settings = dict(r["settings"])
        if r.get("solved_schedule"):  # the schedule acc solved for its speedup in the quality pass
            settings = {k: v for k, v in settings.items() if k not in ("speedup", "flops")}
            settings["schedule"] = r["solved_schedule"]
        method = tokens.build(r["method"], settings)
        r["latency_b1"], r["dense_s_b1"] = latency_ratio(model, method, one, args.reps)
        r["latency_b32"], r["dense_s_b32"] = latency_ratio(model, method, b32, args.reps)
        print(json.dumps({k: r[k] for k in ("method", "settings", "flops_ratio", "latency_b1", "latency_b32")}), flush=True)
    result.update({"where": args.where, "threads": args.threads, "reps": args.reps, "b1_images": len(one), "b32_batches": len(b32),
                   "targets": check_targets(result["rows"]),
                   "command": "PYTHONPATH=src python benchmarks/p4_vision.py " + shlex.join(sys.argv[1:])})
    return result


def kept_rows(before: dict, rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """The saved rows of a part that this run leaves alone: structure rows of other names (with --only), EET rows at
    other FLOPs shares."""
    if args.part == "structure" and args.only:
        return [r for r in before["rows"] if r["name"] not in {n["name"] for n in rows}]
    if args.part == "eet":
        return [r for r in before["rows"] if r["stage"] != "dense" and r["target_flops"] not in args.flops]
    return []


def quality_pass(model, px: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace) -> dict:
    L = len(model.encoder.layer)
    t0 = time.perf_counter()
    dense = image_features(model, px, args.batch)
    rows = [{"method": "dense", "settings": {}, "flops_ratio": 1.0, **quality(dense, labels, dense),
             "seconds": time.perf_counter() - t0}]
    print(json.dumps(rows[0]), flush=True)
    for f in args.flops:
        for name, settings in settings_at(f):
            if args.only and name not in args.only:
                continue
            settings = {**settings, "recover": L}
            method = tokens.build(name, settings)
            t0 = time.perf_counter()
            try:
                feats, fl = {"cls": [], "mean": []}, [0.0, 0.0]
                with tokens.prune(model, method) as session:
                    for i in range(0, len(px), args.batch):
                        part = image_features(model, px[i:i + args.batch], args.batch)
                        for k in feats:
                            feats[k].append(part[k])
                        fl[0] += session.flops()["dense"]
                        fl[1] += session.flops()["pruned"]
            except ValueError as e:  # e.g. a speedup out of reach on this machine: report it, go on
                rows.append({"method": name, "settings": settings, "target_flops": f, "error": str(e)})
                print(json.dumps(rows[-1]), flush=True)
                continue
            feats = {k: torch.cat(v) for k, v in feats.items()}
            rows.append({
                "method": name, "settings": settings, "target_flops": f, "keep": method.keep,
                "solved_schedule": getattr(method, "solved", None), "flops_ratio": fl[1] / fl[0],
                **quality(feats, labels, dense), "seconds": time.perf_counter() - t0,
            })
            print(json.dumps(rows[-1]), flush=True)
    return {"benchmark": "P4-vision", "model": "dinov2-s", "views": args.views, "sources": int(labels.max()) + 1,
            "images": len(labels), "seed": args.seed, "rows": rows}


# Width cuts (trimformer.structure.width) at 30 % fewer parameters, and at the FLOPs that leaves, on heads and
# MLP neurons; FFN widths a multiple of 8. "global/fisher, 4 rounds" is the NViT-style cut (global importance of
# the output features, re-measured after each of 4 steps); "+ hidden" adds the embedding dimension (hidden channels,
# structure/channels.py) to the same global budget, as NViT does.
WIDTH = {"parts": ["ffn", "heads"], "multiple_of": 8}
CHANNELS = {"parts": ["hidden"], "multiple_of": 8, "importance": "fisher", "target": "params=0.88"}
HIDDEN = {"parts": ["ffn", "heads", "hidden"], "multiple_of": 8, "importance": "fisher", "allocation": "global", "rounds": 4}
STRUCTURE = [
    ("uniform/hessian", {**WIDTH, "target": "params=0.7", "importance": "hessian", "allocation": "uniform"}),
    ("global/fisher", {**WIDTH, "target": "params=0.7", "importance": "fisher", "allocation": "global"}),
    ("global/fisher, 4 rounds", {**WIDTH, "target": "params=0.7", "importance": "fisher", "allocation": "global",
                                 "rounds": 4}),
    ("global/hessian", {**WIDTH, "target": "params=0.7", "importance": "hessian", "allocation": "global"}),
    ("uniform/fisher", {**WIDTH, "target": "params=0.7", "importance": "fisher", "allocation": "uniform"}),
    ("global/fisher, flops, 4 rounds", {**WIDTH, "target": "flops=0.6", "importance": "fisher", "allocation": "global",
                                        "attention_flops": True, "rounds": 4}),
    # NViT's latency-aware allocation: every unit priced by the time it saves at batch 32 (structure/latency.py),
    # beside the FLOPs-priced row above at the same share
    ("global/fisher, latency b32, 4 rounds", {**WIDTH, "target": "latency=0.6", "importance": "fisher",
                                              "allocation": "global", "latency_batch": 32, "rounds": 4}),
    ("global/fisher + hidden, latency b32, 4 rounds", {**HIDDEN, "target": "latency=0.6", "latency_batch": 32}),
    ("global/fisher + hidden, 4 rounds", {**HIDDEN, "target": "params=0.7"}),
    ("global/fisher + hidden, flops, 4 rounds", {**HIDDEN, "target": "flops=0.6", "attention_flops": True}),
    # hidden channels first (params 0.88 alone: 336 of 384), then heads and neurons to the row's overall target
    ("hidden 0.88, then global/fisher, 4 rounds", [CHANNELS, {**WIDTH, "target": "params=0.7", "importance": "fisher",
                                                              "allocation": "global", "rounds": 4}]),
    ("hidden 0.88, then global/fisher, flops, 4 rounds", [CHANNELS, {**WIDTH, "target": "flops=0.6", "importance": "fisher",
                                                                     "allocation": "global", "attention_flops": True,
                                                                     "rounds": 4}]),
]
WEIGHTS = [("sparsegpt", {"sparsity": 0.5, "pattern": "2:4"}), ("wanda", {"sparsity": 0.5, "pattern": "2:4"})]

_RELOAD = """
import sys, torch, transformers
m = transformers.AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(m(pixel_values=torch.load(sys.argv[2])).last_hidden_state, sys.argv[3])
assert not any(k.startswith("trimformer") for k in sys.modules), "trimformer was imported"
"""


@torch.no_grad()
def vanilla_reload_diff(model, px: torch.Tensor) -> float:
    """Export `model`, reload it with vanilla transformers in a process without trimformer on its path, and
    return the max abs difference of its features on `px` from `model`'s."""
    from trimformer.export import structured

    want = model(pixel_values=px).last_hidden_state
    with tempfile.TemporaryDirectory() as d:
        structured.save(model, Path(d) / "m")
        torch.save(px, Path(d) / "px.pt")
        env = {"PYTHONPATH": "", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", _RELOAD, str(Path(d) / "m"), str(Path(d) / "px.pt"),
                        str(Path(d) / "out.pt")], check=True, env=env, cwd=d)
        got = torch.load(Path(d) / "out.pt")
    return (got - want).abs().max().item()


def training_views(args: argparse.Namespace, holdout: bool = False) -> torch.Tensor:
    """Other random views (seed + 1) of the sources, never the evaluated views; no labels are used. holdout: of the
    even-numbered sources only, so that the odd ones (HELD_OUT) are images training never saw."""
    from trimformer.data.images import image_files

    files = image_files()
    px, _ = retrieval_views(ViewConfig(views=args.train_views, seed=args.seed + 1), files=files[::2] if holdout else files)
    return px


def held_out(labels: torch.Tensor) -> torch.Tensor:
    """(n,) bool: the evaluated views of the odd-numbered sources, which `training_views(holdout=True)` leaves out."""
    return labels % 2 == 1


def quality_on(feats: dict, labels: torch.Tensor, dense: dict, mask: torch.Tensor) -> dict:
    """Retrieval among the views under `mask` only (gallery and queries), cosine to dense on them."""
    return quality({k: v[mask] for k, v in feats.items()}, labels[mask], {k: v[mask] for k, v in dense.items()})


def structure_pass(model, px: torch.Tensor, labels: torch.Tensor, dense: dict, args: argparse.Namespace) -> list[dict]:
    from trimformer.models import count_parameters
    from trimformer.recover import FeatureDistillConfig, distill_features_

    train = training_views(args, holdout=args.holdout)
    calib = train[:: max(1, len(train) // args.calib_images)][: args.calib_images]
    timing = timing_batches(px, args)
    before = count_parameters(model)
    mask = held_out(labels)
    rows = []
    for name, settings in STRUCTURE:
        if args.only and name not in args.only:
            continue
        pruned = copy.deepcopy(model)
        t0 = time.perf_counter()
        steps = settings if isinstance(settings, list) else [settings]
        for i, step in enumerate(steps):  # the last step's target is the row's overall one
            trimformer.prune_(pruned, trimformer.build("width", overall(step, model, pruned) if i else step),
                              calibration=calib, batch_size=16, progress=False)
        res = pruned.trimformer_history[-1]["result"]
        attention = any(s.get("attention_flops") for s in steps)
        row = {"method": "width", "name": name, "settings": settings, "params_ratio": count_parameters(pruned) / before,
               "flops_ratio": block_flops(pruned, attention) / block_flops(model, attention),
               "matmul_ratio": block_flops(pruned, False) / block_flops(model, False), "ffn": res["ffn"],
               "heads": res["head_units"], "hidden": pruned.config.hidden_size,
               "prune_seconds": time.perf_counter() - t0, "calibration_images": len(calib)}
        if "latency_modelled" in res:  # a latency budget: the share it measured after the cut, and its own model's
            row.update(budget_spent=res["spent"], latency_modelled=res["latency_modelled"], latency_prices=res["latency"])
        feats = image_features(pruned, px, args.batch)
        kept = getattr(pruned, "trimformer_channels", None)  # hidden channels cut: cosine on those left
        ref = dense if kept is None else {k: v[..., kept] for k, v in dense.items()}
        row["training_free"] = quality(feats, labels, ref)
        if args.holdout:
            row["training_free_held_out"] = quality_on(feats, labels, ref, mask)
        print(json.dumps({k: row[k] for k in ("name", "params_ratio", "flops_ratio", "training_free")}), flush=True)
        if args.steps and not (args.recover and name not in args.recover):
            cfg = FeatureDistillConfig(steps=args.steps, batch_size=args.train_batch, lr=args.lr, loss=args.loss,
                                       max_minutes=args.minutes)
            t0 = time.perf_counter()
            distill_features_(pruned, model, train, cfg, progress=False)
            h = pruned.trimformer_history[-1]
            feats = image_features(pruned, px, args.batch)
            row["recovered"] = quality(feats, labels, ref)
            if args.holdout:
                row["recovered_held_out"] = quality_on(feats, labels, ref, mask)
            row["recovery"] = {"settings": h["settings"], "steps_run": h["result"]["steps_run"], "images": len(train),
                               "first_loss": h["result"]["losses"][0], "last_loss": h["result"]["losses"][-1],
                               "seconds": time.perf_counter() - t0}
            print(json.dumps({k: row[k] for k in ("name", "recovered", "recovery")}), flush=True)
        row["reload_max_abs_diff"] = vanilla_reload_diff(pruned, px[:4])
        row["latency_b1"], row["dense_s_b1"] = latency_ratio(model, None, timing[0], args.reps, pruned=pruned)
        row["latency_b32"], row["dense_s_b32"] = latency_ratio(model, None, timing[1], args.reps, pruned=pruned)
        print(json.dumps({k: row[k] for k in ("name", "reload_max_abs_diff", "latency_b1", "latency_b32")}), flush=True)
        rows.append(row)
    return rows


def block_flops(model, attention: bool, tokens: int = 257) -> float:
    """Multiply-adds per token of the block projections, plus (attention) every head's scores and weighted sum over
    `tokens` keys: what width's FLOPs budget counts (with attention_flops)."""
    from trimformer.models import anatomy_of
    from trimformer.structure.costs import matmul_params
    from trimformer.structure.width import attention_per_head

    an = anatomy_of(model)
    return matmul_params(an) + attention * sum(attention_per_head(b, tokens) * b.attention.num_heads
                                               for b in an.blocks if b.attention)


def overall(step: dict, dense, pruned) -> dict:
    """`step` with its target (the row's overall share of the dense model) made a share of the `pruned` model so far."""
    from trimformer.models import count_parameters

    kind, share = step["target"].split("=")
    if kind == "params":
        now = count_parameters(pruned) / count_parameters(dense)
    else:
        now = block_flops(pruned, step.get("attention_flops", False)) / block_flops(dense, step.get("attention_flops", False))
    return {**step, "target": f"{kind}={float(share) / now:.6f}"}


def token_quality(model, method, px: torch.Tensor, labels: torch.Tensor, dense: dict, batch: int,
                  mask: torch.Tensor | None = None) -> dict:
    """Quality and measured FLOPs ratio of `model` inside token `method` (as the quality pass measures them);
    with `mask`, also 'held_out': the quality among those views only."""
    feats, fl = {"cls": [], "mean": []}, [0.0, 0.0]
    with tokens.prune(model, method) as session:
        for i in range(0, len(px), batch):
            part = image_features(model, px[i:i + batch], batch)
            for k in feats:
                feats[k].append(part[k])
            fl[0] += session.flops()["dense"]
            fl[1] += session.flops()["pruned"]
    feats = {k: torch.cat(v) for k, v in feats.items()}
    out = {"flops_ratio": fl[1] / fl[0], **quality(feats, labels, dense)}
    if mask is not None:
        out["held_out"] = quality_on(feats, labels, dense, mask)
    return out


def eet_pass(model, px: torch.Tensor, labels: torch.Tensor, dense: dict, args: argparse.Namespace) -> list[dict]:
    """EET training-free at each FLOPs share, and with the teacher transfer (the dense model's features learnt
    inside the pruning, recover/features.py) at --eet-transfer, at the same schedule (equal FLOPs)."""
    from trimformer.recover import FeatureDistillConfig, distill_features_

    L = len(model.encoder.layer)
    train = training_views(args, holdout=True)
    timing = timing_batches(px, args)
    mask = held_out(labels)
    rows = [{"method": "dense", "stage": "dense", "held_out": quality_on(dense, labels, dense, mask)}]
    for f in args.flops:
        settings = {"flops": f, "recover": L}
        method = tokens.build("eet", settings)
        row = {"method": "eet", "settings": settings, "target_flops": f, "stage": "training-free",
               **token_quality(model, method, px, labels, dense, args.batch, mask)}
        row["latency_b1"], row["dense_s_b1"] = latency_ratio(model, method, timing[0], args.reps)
        row["latency_b32"], row["dense_s_b32"] = latency_ratio(model, method, timing[1], args.reps)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if f not in (args.eet_transfer or []):
            continue
        student = copy.deepcopy(model)
        cfg = FeatureDistillConfig(steps=args.steps, batch_size=args.train_batch, lr=args.lr, loss=args.eet_loss,
                                   max_minutes=args.minutes)
        t0 = time.perf_counter()
        distill_features_(student, model, train, cfg, method=tokens.build("eet", settings), progress=False)
        h = student.trimformer_history[-1]
        rows.append({**{k: row[k] for k in ("method", "settings", "target_flops", "latency_b1", "latency_b32")},
                     "stage": "teacher transfer", **token_quality(student, method, px, labels, dense, args.batch, mask),
                     "recovery": {"settings": h["settings"], "steps_run": h["result"]["steps_run"], "images": len(train),
                                  "first_loss": h["result"]["losses"][0], "last_loss": h["result"]["losses"][-1],
                                  "seconds": time.perf_counter() - t0}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def weights_pass(model, px: torch.Tensor, labels: torch.Tensor, dense: dict, args: argparse.Namespace) -> list[dict]:
    train = training_views(args)
    calib = train[:: max(1, len(train) // args.calib_images)][: args.calib_images]
    rows = []
    for name, settings in WEIGHTS:
        if args.only and name not in args.only:
            continue
        pruned = copy.deepcopy(model)
        t0 = time.perf_counter()
        trimformer.prune_(pruned, trimformer.build(name, settings), calibration=calib, batch_size=16, progress=False)
        rows.append({"method": name, "settings": settings, "seconds": time.perf_counter() - t0,
                     "calibration_images": len(calib), **quality(image_features(pruned, px, args.batch), labels, dense)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def timing_batches(px: torch.Tensor, args: argparse.Namespace) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    one = [px[i:i + 1] for i in range(0, len(px), max(1, len(px) // args.b1_images))][:args.b1_images]
    return one, [px[i:i + 32] for i in range(0, 32 * args.b32_batches, 32)]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--views", type=int, default=6, help="K views per source image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flops", type=float, nargs="+", default=list(FLOPS))
    p.add_argument("--only", nargs="+", metavar="METHOD", help="run only these methods (e.g. merge acc)")
    p.add_argument("--batch", type=int, default=32, help="batch of the quality pass")
    p.add_argument("--b1-images", type=int, default=8, help="single images timed at batch 1")
    p.add_argument("--b32-batches", type=int, default=1, help="batches of 32 timed")
    p.add_argument("--reps", type=int, default=3)
    threads_arg(p, default=1)
    out_arg(p, "p4_vision")
    p.add_argument("--where", default="under the shared lock", help="how the timings were taken, for the report")
    p.add_argument("--part", choices=("all", "quality", "timing", "structure", "weights", "eet"), default="all",
                   help="quality: no timings, no lock needed; timing: add timings to a saved quality pass; "
                        "structure / weights / eet: add width, 2:4 or EET rows to the saved run")
    p.add_argument("--eet-transfer", type=float, nargs="*", default=[0.6],
                   help="eet: the FLOPs shares at which to train the teacher transfer too")
    p.add_argument("--eet-loss", default="tokens+cls+rank", help="eet: the transfer's loss (recover/features.py)")
    p.add_argument("--train-views", type=int, default=8, help="structure/weights: views per source to calibrate and "
                   "train on (seed + 1: not the evaluated views)")
    p.add_argument("--calib-images", type=int, default=64, help="structure/weights: calibration images")
    p.add_argument("--steps", type=int, default=300, help="structure: distillation steps (0: training-free only)")
    p.add_argument("--minutes", type=float, default=12.0, help="structure: training time limit per recovered row")
    p.add_argument("--recover", nargs="+", metavar="NAME", help="structure: recover only these rows (default: all)")
    p.add_argument("--holdout", action="store_true", help="structure: calibrate and train on the even-numbered "
                   "sources only and also score the odd ones alone (images training never saw); eet always does")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--loss", default="tokens+cls")
    args = p.parse_args(argv)
    result = run(args)
    if args.part != "quality":
        write(result, Path(args.out))
    return result


if __name__ == "__main__":
    main()
