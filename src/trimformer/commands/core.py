"""Core subcommands: info, prune, eval, report."""

from __future__ import annotations

import argparse
import json

from . import parse_pairs


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a model's anatomy: blocks, heads / KV heads, FFN, parameters per part")
    p.add_argument("model", help="bundled name (smollm2-135m, minilm-l6), HF directory, .gguf file or hub id")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)
    add_prune(sub)
    add_eval(sub)
    add_report(sub)


def cmd_info(args: argparse.Namespace) -> int:
    from .. import anatomy_of, load

    s = anatomy_of(load(args.model)).summary()
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{args.model}: {s['family']} ({s['model_type']}), {'decoder' if s['causal'] else 'encoder'}, "
          f"{s['num_blocks']} blocks, hidden {s['hidden_size']}, vocab {s['vocab_size']}, "
          f"{'pre' if s['pre_norm'] else 'post'}-norm, tied embeddings: {s['tied_embeddings']}")
    print(f"parameters: {s['params_total']:,} total = embed {s['params_embed']:,} + blocks {s['params_blocks']:,}"
          f" + head {s['params_head']:,} (+ norms/positions)")
    print(f"{'block':>5} {'heads':>5} {'kv':>3} {'hdim':>4} {'ffn':>6} {'attn params':>12} {'mlp params':>11}")
    for b in s["blocks"]:
        print(f"{b['index']:>5} {b['heads']:>5} {b['kv_heads']:>3} {b['head_dim']:>4} {b['ffn']:>6} "
              f"{b['attention_params']:>12,} {b['mlp_params']:>11,}")
    return 0


def _add_eval_options(p: argparse.ArgumentParser, prefix_help: str = "") -> None:
    g = p.add_argument_group("evaluation (BENCHMARK.md P1/P2 on the doc corpus' evaluation pool)")
    g.add_argument("--eval-windows", type=int, default=64, help="evaluation windows for perplexity (default 64)")
    g.add_argument("--kl-windows", type=int, default=16, help="windows for KL / top-1 agreement (default 16)")
    g.add_argument("--eval-length", type=int, default=512, help="tokens per evaluation window (default 512)")
    g.add_argument("--no-speed", action="store_true", help="skip the latency measurement")
    g.add_argument("--speed-runs", type=int, default=5, help="timed runs per model, median reported (default 5)")


def _evaluate(args: argparse.Namespace, model, tok, reference) -> dict:
    """Run `evaluate` with the options added by `_add_eval_options`."""
    from .. import evaluate
    from ..progress import quiet

    return evaluate(model, tok, reference=reference, windows=args.eval_windows, kl_windows=args.kl_windows,
                    length=args.eval_length, measure_speed=not args.no_speed, speed_runs=args.speed_runs,
                    progress=not quiet())




def add_prune(sub: argparse._SubParsersAction) -> None:
    from ..methods import REGISTRIES
    from .weights import add_engine_options

    names = ", ".join(n for reg in REGISTRIES for n in reg.names())
    p = sub.add_parser(
        "prune",
        help="prune a model, evaluate it against the dense model, save checkpoint + report",
        description=f"Methods: {names}. Any field of the method's config is also a flag (e.g. "
        "`--method width --target params=0.8 --multiple-of 8`); `--allocation owl|adaptive|global` spreads a "
        "weight method's sparsity over layers. Writes OUT/ with the pruned checkpoint (safetensors; heterogeneous "
        "structured results add trimformer_modeling.py), report.json, report.md and trimformer.json (the recipe "
        "and command). The input model is never modified.",
    )
    p.add_argument("--model", required=True, help="bundled name (smollm2-135m, minilm-l6), HF directory, .gguf file or hub id")
    p.add_argument("--method", help=f"one method ({names}); or use --recipe")
    p.add_argument("--recipe", help="YAML/TOML/JSON recipe: a list of steps {method: name, field: value, ...}; a step "
                   "{method: recover, steps: N, teacher: dense} heals the model so far by distillation from the "
                   "model before the recipe, on the calibration windows (any RecoverConfig field)")
    p.add_argument("--sparsity", type=float, help="share of weights removed per layer, in [0, 1) (weight methods)")
    p.add_argument("--pattern", help="'unstructured' or 'N:M' such as 2:4 (weight methods)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any field of the method's config; overrides the recipe (repeatable)")
    p.add_argument("--calib", default="docs",
                   help="calibration text: 'docs' (built-in corpus, calibration half), a text file, a folder, or a .jsonl")
    p.add_argument("--calib-field", default="text", help="field of the JSONL rows holding text (default: text)")
    p.add_argument("--calib-windows", type=int, default=64, help="calibration windows (default 64)")
    p.add_argument("--calib-length", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--batch-size", type=int, default=1, help="calibration windows per forward (default 1)")
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-eval", action="store_true", help="save without evaluating")
    p.add_argument("--format", choices=["hf", "deci", "gguf"], default="hf",
                   help="hf: our checkpoint (plain when uniform, else with trimformer_modeling.py; default); deci: "
                   "DeciLM block_configs for vLLM; gguf: OUT/model-<type>.gguf for llama.cpp. A cut the format "
                   "cannot hold is saved as hf, with the reason")
    add_engine_options(p)
    _add_eval_options(p)
    p.set_defaults(func=cmd_prune)


def _recipe(args: argparse.Namespace):
    from ..methods import Recipe

    if bool(args.method) == bool(args.recipe):
        raise ValueError("give exactly one of --method NAME or --recipe FILE")
    recipe = Recipe.from_file(args.recipe) if args.recipe else Recipe.one(args.method)
    sets = parse_pairs(args.set)
    if args.sparsity is not None:
        sets.setdefault("sparsity", args.sparsity)
    if args.pattern is not None:
        sets.setdefault("pattern", args.pattern)
    recipe = _wrap_allocation(args.method, sets) or (recipe.override(sets) if sets else recipe)
    recipe.build()  # validate every value before any heavy work
    return recipe


def _wrap_allocation(method: str | None, sets: dict):
    """`--method sparsegpt --allocation owl` is the step {method: owl, base: sparsegpt, ...}."""
    from dataclasses import fields

    from ..methods import Recipe, find
    from ..weights import WEIGHTS

    alloc = sets.get("allocation")
    if not method or alloc is None or method not in WEIGHTS:
        return None
    if "allocation" in {f.name for f in fields(find(method))}:
        return None
    wrapper = {f.name for f in fields(find(alloc))} - {"settings"}
    outer = {k: v for k, v in sets.items() if k in wrapper and k != "allocation"}
    inner = {k: v for k, v in sets.items() if k not in wrapper and k != "allocation"}
    return Recipe.one(str(alloc), base=method, settings=inner, **outer)


def cmd_prune(args: argparse.Namespace) -> int:
    import sys
    import time
    from pathlib import Path

    from .. import data, load, prune_
    from ..evaluate import to_markdown
    from ..export import OutputExistsError
    from ..export.layout import ExportError
    from ..progress import quiet
    from ..structure.export import save  # plain HF when uniform, else per-layer shapes + modeling file
    from .weights import check_engine_args, save_engine_format

    recipe = _recipe(args)
    if args.format != "hf":
        check_engine_args(args)
    if Path(args.out).exists() and not args.overwrite:
        raise OutputExistsError(f"output folder {args.out!r} exists; choose another or pass --overwrite")
    t0 = time.perf_counter()
    model, tok = load(args.model, with_tokenizer=True)
    say = (lambda *a: None) if quiet() else (lambda *a: print(*a, file=sys.stderr))
    say(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s")
    needs = any(m.needs_calibration for m in recipe.build())
    calib = None
    if needs:
        calib = data.calibration_windows(tok, args.calib, n=args.calib_windows, length=args.calib_length,
                                         field=args.calib_field)
    prune_(model, recipe, calibration=calib, batch_size=args.batch_size, progress=not quiet())
    for h in model.trimformer_history:
        say(f"{h['method']}: {h['seconds']:.1f} s")
    report = None
    if not args.no_eval:
        reference = load(args.model)
        report = _evaluate(args, model, tok, reference)
        report["calibration"] = None if calib is None else {"source": args.calib, "windows": args.calib_windows,
                                                           "window_tokens": args.calib_length}
    meta = {"trimformer": __import__("trimformer").__version__, "model": args.model,
            "command": "trimformer " + " ".join(sys.argv[1:]), "recipe": recipe.to_list(),
            "history": model.trimformer_history}
    extra = {"trimformer.json": meta}
    if report is not None:
        extra.update({"report.json": report, "report.md": to_markdown(report)})
    if report is not None:
        print(to_markdown(report))
    if args.format == "hf":
        save(model, args.out, tokenizer=tok, extra_files=extra, overwrite=args.overwrite)
    else:
        try:
            save_engine_format(args, model, tok, Path(args.out), extra)
        except ExportError as e:  # the cut is not lost: saved in our own format, and the reason is the error
            save(model, args.out, tokenizer=tok, extra_files=extra, overwrite=args.overwrite)
            raise ExportError(f"{e} (saved {args.out}/ as --format hf instead)") from e
    print(f"saved {args.out}/ ({args.format} checkpoint, report.json, report.md, trimformer.json)")
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model against a reference (dense) model: ppl, KL, top-1, cost, speed")
    p.add_argument("--model", required=True, help="the model to evaluate (folder, bundled name, .gguf, hub id)")
    p.add_argument("--reference", help="the dense model to compare with (recommended)")
    p.add_argument("--json", help="also write the report to this JSON file")
    _add_eval_options(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from .. import load
    from ..evaluate import to_markdown

    try:
        model, tok = load(args.model, with_tokenizer=True)
    except (OSError, ValueError) as e:
        if not args.reference or "tokenizer" not in str(e).lower():
            raise
        model = load(args.model)
        _, tok = load(args.reference, with_tokenizer=True)
    reference = load(args.reference) if args.reference else None
    report = _evaluate(args, model, tok, reference)
    if args.json:
        from ..export.hf import atomic_file

        atomic_file(args.json, json.dumps(report, indent=2, default=str))
    print(to_markdown(report))
    return 0


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="plots and a comparison table over saved runs (quality vs cost frontier)")
    p.add_argument("runs", nargs="+", help="folders written by `trimformer prune`, or report.json files")
    p.add_argument("--out", required=True, help="output folder for index.md and the PNG plots")
    p.add_argument("--x", default="nonzeros", choices=["nonzeros", "params", "flops", "latency"], help="cost axis")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from ..report import write_report

    out = write_report(args.runs, args.out, x=args.x, overwrite=args.overwrite)
    print(f"wrote {out}/index.md and plots")
    return 0
