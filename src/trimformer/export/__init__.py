"""Checkpoints and formats."""

from ..io import OutputExistsError, atomic_dir
from . import llamacpp_latency  # noqa: F401  (registers search --latency-from llamacpp)
from .hf import save_pretrained
from .structured import save

__all__ = ["OutputExistsError", "atomic_dir", "save", "save_pretrained"]
