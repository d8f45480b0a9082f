"""Paragraphs as units of text: the doc corpus' P4 evaluation set, training paragraphs kept apart from it,
and the docstrings of the standard library read from its sources."""

from __future__ import annotations

import ast
import sys
import sysconfig
from pathlib import Path

import torch

from . import doc_corpus


def doc_paragraphs(tokenizer, n: int = 512, lo: int = 32, hi: int = 256) -> list[str]:
    """The first `n` doc-corpus paragraphs of `lo`..`hi` tokens (specials included), in corpus order:
    BENCHMARK.md P4's evaluation set with the defaults. Fewer when the corpus has fewer."""
    chosen: list[str] = []
    if n < 1:
        return chosen
    for p in doc_corpus().split("\n\n"):
        if p.strip() and lo <= len(tokenizer(p)["input_ids"]) <= hi:
            chosen.append(p)
            if len(chosen) == n:
                break
    return chosen


def training_paragraphs(tokenizer, exclude: int = 512, lo: int = 16, hi: int = 256,
                        docstrings: bool = False) -> list[torch.Tensor]:
    """Paragraphs for training, none of them among the first `exclude` doc-corpus paragraphs of 32-256
    tokens (the P4 evaluation set, `doc_paragraphs`), nor a copy of one (the corpus repeats some): each as
    token ids with specials, `lo` to `hi` tokens (longer ones cut to `hi`). The rest of the doc corpus,
    plus with `docstrings` the paragraphs of the standard library's docstrings (`stdlib_docstrings`)."""
    paragraphs = [p for p in doc_corpus().split("\n\n") if p.strip()]
    if docstrings:
        paragraphs += stdlib_docstrings()
    out, seen = [], set(doc_paragraphs(tokenizer, exclude))
    for p in paragraphs:
        if p in seen:
            continue
        seen.add(p)
        ids = tokenizer(p, truncation=True, max_length=hi)["input_ids"]
        if len(ids) >= lo:
            out.append(torch.tensor(ids, dtype=torch.long))
    return out


def stdlib_docstrings() -> list[str]:
    """Paragraphs (12+ words) of the docstrings in this Python's standard-library sources: each public
    module's (a package's `__init__.py`) and those of its top-level classes and functions, modules in name
    order: offline text close to the doc corpus (same subject, other sentences).

    Read with `ast` from the .py files: nothing is imported or run. Modules written in C (math, itertools,
    ...) have no source there and are left out."""
    root = Path(sysconfig.get_path("stdlib"))
    out: list[str] = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_"):
            continue
        path = next((p for p in (root / f"{name}.py", root / name / "__init__.py") if p.is_file()), None)
        if path is None:  # built in, or an extension module
            continue
        tree = ast.parse(path.read_bytes(), filename=str(path))
        nodes = [tree, *(n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
        for node in nodes:
            doc = ast.get_docstring(node) or ""
            out += [p for p in doc.split("\n\n") if len(p.split()) >= 12]
    return out
