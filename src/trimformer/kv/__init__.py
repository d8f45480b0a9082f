"""KV-cache pruning that frees memory: presses score cached tokens (or key channels) per layer and KV
head; `PressCache` stores only what they keep (per-head lengths packed, dropped key channels removed).

    with trimformer.kv.press(model, "snapkv", ratio=0.5):
        out = model.generate(**inputs, max_new_tokens=256)
    with trimformer.kv.press(model, trimformer.kv.PerHead("snapkv", ratio=0.75)):
        ...
"""

from .base import PRESSES, Observation, Press
from .cache import PressCache, PressLayer
from .hooks import Session, build_press, press
from .presses import Compose, PerHead, PerLayer
from .presses.expected import ExpectedAttention
from .presses.h2o import A2SF, H2O
from .presses.knorm import KeyNorm
from .presses.random import Random
from .presses.snapkv import SnapKV
from .presses.streaming import Streaming
from .presses.think import ThinK
from .presses.tova import TOVA

__all__ = [
    "A2SF", "H2O", "PRESSES", "TOVA", "Compose", "ExpectedAttention", "KeyNorm", "Observation", "PerHead",
    "PerLayer", "Press", "PressCache", "PressLayer", "Random", "Session", "SnapKV", "Streaming", "ThinK",
    "build_press", "press",
]
