"""Recovery: distillation fine-tuning of a pruned model from its dense teacher, keeping masks and shapes,
merge-aware distillation of an encoder for token merging, and feature distillation of a vision encoder
(after a structural cut, or under a token method); all on one training loop (loop.py)."""

from .config import GMP, Checkpointing, Freezing, Lasso, LoRAConfig, Memory, Objective, RecoverConfig
from .cycles import prune_recover_cycles_
from .features import FeatureDistillConfig, distill_features_
from .loop import Callback, NonFiniteLossError, Run, Schedule, train_
from .masks import MaskKeeper, cubic_sparsity
from .merging import DistillConfig, distill_merge_
from .train import recover_

__all__ = ["GMP", "Callback", "Checkpointing", "DistillConfig", "FeatureDistillConfig", "Freezing", "Lasso", "LoRAConfig",
           "MaskKeeper", "Memory", "NonFiniteLossError", "Objective", "RecoverConfig", "Run", "Schedule",
           "cubic_sparsity", "distill_features_", "distill_merge_", "prune_recover_cycles_", "recover_", "train_"]
