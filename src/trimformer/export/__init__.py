"""Checkpoints and formats."""

from ..io import OutputExistsError, atomic_dir
from .hf import save_pretrained
from .structured import save

__all__ = ["OutputExistsError", "atomic_dir", "save", "save_pretrained"]
