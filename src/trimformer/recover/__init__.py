"""Recovery: distillation fine-tuning of a pruned model from its dense teacher, keeping masks and shapes."""

from .cycles import prune_recover_cycles_
from .masks import MaskKeeper, cubic_sparsity
from .train import NonFiniteLossError, RecoverConfig, recover_

__all__ = ["MaskKeeper", "NonFiniteLossError", "RecoverConfig", "cubic_sparsity", "prune_recover_cycles_", "recover_"]
