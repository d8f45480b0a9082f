"""Progress bars (tqdm), silenced by `--quiet` / `set_quiet(True)`."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_QUIET = bool(os.environ.get("TRIMFORMER_QUIET"))


def set_quiet(quiet: bool) -> None:
    """Silence our bars and those of transformers / huggingface_hub (loading, saving)."""
    global _QUIET
    _QUIET = quiet
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def quiet() -> bool:
    return _QUIET


def bar(it: Iterable[T], desc: str, unit: str = "it", disable: bool = False, total: int | None = None) -> Iterable[T]:
    return tqdm(it, desc=desc, unit=unit, disable=disable or _QUIET, total=total, leave=False, dynamic_ncols=True)
