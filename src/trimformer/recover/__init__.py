"""Recovery: distillation fine-tuning of a pruned model from its dense teacher, keeping masks and shapes,
and merge-aware distillation of an encoder for token merging; both on one training loop (loop.py)."""

from .config import GMP, Checkpointing, Freezing, Lasso, LoRAConfig, Memory, Objective, RecoverConfig
from .cycles import prune_recover_cycles_
from .loop import Callback, NonFiniteLossError, Run, Schedule, train_
from .masks import MaskKeeper, cubic_sparsity
from .merging import DistillConfig, distill_merge_
from .train import recover_

__all__ = ["GMP", "Callback", "Checkpointing", "DistillConfig", "Freezing", "Lasso", "LoRAConfig", "MaskKeeper", "Memory",
           "NonFiniteLossError", "Objective", "RecoverConfig", "Run", "Schedule", "cubic_sparsity", "distill_merge_",
           "prune_recover_cycles_", "recover_", "train_"]
