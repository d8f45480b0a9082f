"""One JSON schema for every evaluation, and its Markdown summary."""

from __future__ import annotations

import platform

import torch
from torch import nn

from .. import data
from ..models import Anatomy, anatomy_of
from .cost import cost
from .quality import embedding_fidelity, kl_top1, perplexity
from .speed import peak_rss_bytes, speed
from .tasks import TaskEval, task_scores

SCHEMA = "trimformer.report/1"


def evaluate(
    model: nn.Module,
    tokenizer,
    *,
    reference: nn.Module | None = None,
    windows: int = 64,
    kl_windows: int = 16,
    code_windows: int = 8,
    length: int = 512,
    measure_speed: bool = True,
    speed_runs: int = 5,
    decode_steps: int = 32,
    progress: bool = True,
    tasks: TaskEval | list[str] | None = None,
) -> dict:
    """Quality against `reference` (the dense model) and cost, on the doc corpus' evaluation pool (P1).

    Decoders: perplexity, KL(dense || model) and top-1 agreement (windows=0: none); the same KL and agreement on
    `code_windows` windows of Python source (out of domain: nobody calibrates on it; 0 skips it). Encoders: cosine of mean-pooled
    embeddings against the reference. Cost: parameters, non-zeros, FLOPs/token, bytes; speed and peak memory.
    tasks: zero-shot task accuracy through lm-eval (evaluate.tasks.TaskEval, or task names): the `tasks` section.
    """
    a = anatomy_of(model)
    if reference is not None:
        check_comparable(a, anatomy_of(reference))
    report: dict = {
        "schema": SCHEMA,
        "model": {"source": getattr(model, "trimformer_source", None), "family": a.family,
                  "model_type": a.config.model_type},
        "reference": None if reference is None else {"source": getattr(reference, "trimformer_source", None)},
        "history": getattr(model, "trimformer_history", []),
    }
    ev = data.evaluation_windows(tokenizer, n=windows, length=length) if windows else None  # (windows, length)
    quality: dict = {}
    if ev is None:
        pass
    elif a.causal:
        quality["ppl"] = perplexity(model, ev, progress)
        if reference is not None:
            quality["ppl_reference"] = perplexity(reference, ev, progress)
            quality.update(kl_top1(model, reference, ev[:kl_windows], progress))
            if code_windows:
                code = data.evaluation_windows(tokenizer, n=code_windows, length=length, corpus="code")
                quality.update({f"{k}_code": v for k, v in kl_top1(model, reference, code, progress).items()})
    elif reference is not None:
        quality.update(embedding_fidelity(model, reference, ev, progress))
    report["protocol"] = {"corpus": "python-docs (pydoc_data.topics), evaluation pool", "windows": windows,
                          "window_tokens": length, "kl_windows": min(kl_windows, windows) if a.causal else windows,
                          "code_windows": code_windows if a.causal and reference is not None else 0,
                          "code": f"stdlib source ({', '.join(data.CODE_MODULES)}), out of domain"}
    report["quality"] = quality
    if tasks is not None:
        report["tasks"] = task_scores(model, tokenizer, tasks, progress=progress)
    c = cost(model, context=length)
    if reference is not None:
        rc = cost(reference, context=length)
        c.update({f"{k}_reference": rc[k] for k in ("params", "nonzeros", "flops_per_token", "model_bytes")})
        c["flops_ratio"] = c["flops_per_token"] / rc["flops_per_token"]
    report["cost"] = c
    if measure_speed:
        report["speed"] = speed(model, reference, prefill_tokens=length, decode_steps=decode_steps,
                                runs=speed_runs, causal=a.causal, vocab=min(a.vocab_size or 1000, 30000))
    report["memory"] = {"peak_rss_bytes": peak_rss_bytes(), "note": "process peak resident memory so far"}
    import transformers

    report["environment"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                             "python": platform.python_version(), "threads": torch.get_num_threads(),
                             "machine": platform.machine()}
    return report


def check_comparable(model: Anatomy, reference: Anatomy) -> None:
    """A model is compared with its dense reference token by token: same kind of model, same vocabulary."""
    if model.causal != reference.causal:
        kinds = ["an encoder", "a decoder"]
        raise ValueError(f"cannot compare {kinds[model.causal]} ({model.family}) with {kinds[reference.causal]} "
                         f"({reference.family}) as its reference; give the dense model this one was pruned from")
    if model.vocab_size != reference.vocab_size:
        raise ValueError(f"the model's vocabulary ({model.vocab_size} tokens) differs from the reference's "
                         f"({reference.vocab_size}); give the dense model this one was pruned from")


def _fmt(v, kind: str = "") -> str:
    if v is None:
        return "–"
    if kind == "int":
        return f"{int(v):,}"
    if kind == "flops":
        return f"{v / 1e6:,.1f} M"
    if kind == "pct":
        return f"{100 * v:.1f} %"
    if kind == "ms":
        return f"{1000 * v:.1f} ms"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def to_markdown(report: dict) -> str:
    q, c, s = report.get("quality", {}), report.get("cost", {}), report.get("speed", {})
    ref = report.get("reference") is not None
    p = report.get("protocol", {})
    lines = [f"# trimformer report: {report['model'].get('source')}", ""]
    for h in report.get("history", []):
        settings = ", ".join(f"{k}={v}" for k, v in h.get("settings", {}).items())
        lines.append(f"- step `{h['method']}` ({settings}): {h.get('seconds', 0):.1f} s")
    if report.get("history"):
        lines.append("")
    lines += ["| metric | model | dense reference |", "| --- | --- | --- |"]

    def row(name: str, a, b=None, kind: str = "") -> None:
        lines.append(f"| {name} | {_fmt(a, kind)} | {_fmt(b, kind) if ref else '–'} |")

    if "ppl" in q:
        row(f"perplexity (doc corpus, {p.get('windows')} x {p.get('window_tokens')} tokens)", q["ppl"], q.get("ppl_reference"))
    if "kl" in q:
        row(f"KL(dense ‖ model), {p.get('kl_windows')} windows", q["kl"], 0.0)
        row("top-1 agreement with dense", q["top1_agree"], 1.0, "pct")
    if "kl_code" in q:
        row(f"KL(dense ‖ model), out of domain: Python source, {p.get('code_windows')} windows", q["kl_code"], 0.0)
        row("top-1 agreement with dense, Python source", q["top1_agree_code"], 1.0, "pct")
    if "cos_mean" in q:
        row("embedding cosine vs dense, mean", q["cos_mean"], 1.0)
        row("embedding cosine vs dense, 5th percentile", q["cos_p5"], 1.0)
    row("parameters", c.get("params"), c.get("params_reference"), "int")
    row("non-zero parameters", c.get("nonzeros"), c.get("nonzeros_reference"), "int")
    row("sparsity of pruned projections", c.get("sparsity_prunable"), None, "pct")
    row(f"FLOPs/token, dense kernels (ctx {c.get('flops_context')})", c.get("flops_per_token"), c.get("flops_per_token_reference"), "flops")
    row("FLOPs/token counting non-zeros only", c.get("flops_per_token_nonzero"), None, "flops")
    row("weights + buffers bytes", c.get("model_bytes"), c.get("model_bytes_reference"), "int")
    if s:
        row(f"prefill latency, 1 x {s['prefill_tokens']} (median of {s['runs']})", s.get("prefill_s"), s.get("prefill_s_reference"), "ms")
        if "decode_tokens_per_s" in s:
            row(f"decode tokens/s ({s['decode_steps']} greedy steps)", s.get("decode_tokens_per_s"), s.get("decode_tokens_per_s_reference"))
    lines.append("")
    if report.get("tasks"):
        lines += tasks_markdown(report["tasks"])
    if ref and s.get("prefill_ratio") is not None:
        lines.append(f"Measured prefill latency ratio model/dense: **{s['prefill_ratio']:.3f}**; "
                     f"FLOPs ratio (dense kernels): **{c.get('flops_ratio', 1.0):.3f}**. "
                     "Unstructured and N:M zeros are not skipped by dense kernels, so they save no time by themselves.")
    lines.append(f"Peak process memory: {report['memory']['peak_rss_bytes'] / 2**20:,.0f} MiB. "
                 f"torch {report['environment']['torch']}, {report['environment']['threads']} threads.")
    return "\n".join(lines) + "\n"


def tasks_markdown(t: dict) -> list[str]:
    """The `tasks` section as a table: one row per task (its headline metric), then the mean."""
    st = t["settings"]
    items = "every item" if st["limit"] is None else f"the first {st['limit']} items of each"
    lines = [f"Zero-shot tasks (lm-eval {t['versions'].get('lm-eval')}, {st['num_fewshot']}-shot, {items}):", "",
             "| task | metric | value | ± stderr | items | split |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for name, r in t["results"].items():
        err = "–" if r["stderr"] is None else f"{100 * r['stderr']:.1f}"
        lines.append(f"| {name} | {r['metric']} | {100 * r['value']:.1f} | {err} | {r['n']:,} | {r['split']} |")
    err = "–" if t.get("mean_stderr") is None else f"{100 * t['mean_stderr']:.1f}"
    lines += [f"| **mean** | | **{100 * t['mean']:.1f}** | {err} | | |", ""]
    return lines
