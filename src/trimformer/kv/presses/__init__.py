"""Registered presses (explicit imports fill `PRESSES`)."""

from ..compose import Compose
from . import expected, h2o, knorm, random, rolling, snapkv, streaming, think, tova  # noqa: F401
from .wrappers import PerHead, PerLayer

__all__ = ["Compose", "PerHead", "PerLayer"]
