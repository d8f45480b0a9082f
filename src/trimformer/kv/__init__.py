"""KV-cache pruning that frees memory: presses score cached tokens (or key channels) per layer and KV
head; `PressCache` stores only what they keep (per-head lengths packed, dropped key channels removed).

    with trimformer.kv.press(model, "snapkv", ratio=0.5):
        out = model.generate(**inputs, max_new_tokens=256)
    with trimformer.kv.press(model, trimformer.kv.PerHead("snapkv", ratio=0.75)):
        ...

Query-agnostic use: compress a context once, ask several questions (the press never sees them):

    with trimformer.kv.press(model, "snapkv", ratio=0.5) as session:
        cache = session.prefill(context_ids)
        for q in questions:   # each question continues a copy; positions continue from the full length
            model.generate(torch.cat([context_ids, q], 1), cache=cache.copy(), max_new_tokens=32)

`ratio` is the share of the prompt's cache removed; `decode_budget=N` also caps each head at N tokens
while decoding. Only the first forward on an empty cache is compressed (the prefill); later forwards
append, and evict only beyond the decode budget. `cache.nbytes` is what is physically held.
"""

from .base import PRESSES, Observation, Press
from .build import build_press
from .cache import PressCache, PressLayer
from .hooks import Session, press
from .presses import Compose, PerHead, PerLayer
from .presses.expected import ExpectedAttention
from .presses.h2o import A2SF, H2O, VATP, ObservedAttention
from .presses.knorm import KeyNorm
from .presses.random import Random
from .presses.rolling import RollingMemory
from .presses.snapkv import SnapKV
from .presses.streaming import Streaming
from .presses.think import ThinK
from .presses.tova import TOVA

__all__ = [
    "A2SF", "H2O", "PRESSES", "TOVA", "Compose", "ExpectedAttention", "KeyNorm", "Observation", "PerHead",
    "ObservedAttention", "PerLayer", "Press", "PressCache", "PressLayer", "Random", "RollingMemory", "Session",
    "SnapKV", "Streaming", "ThinK", "VATP",
    "build_press", "press",
]
