"""Checkpoints and formats."""

from .hf import OutputExistsError, atomic_dir, save_pretrained

__all__ = ["OutputExistsError", "atomic_dir", "save_pretrained"]
