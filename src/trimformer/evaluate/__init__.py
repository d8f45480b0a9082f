"""Quality and cost measurement against the dense model, in one JSON schema."""

from .cost import cost, flops_per_token, nonzeros
from .quality import Reference, compare, embedding_fidelity, kl_top1, log_probs, mean_pooled, perplexity
from .speed import speed
from .summary import SCHEMA, evaluate, to_markdown

__all__ = ["SCHEMA", "Reference", "compare", "cost", "embedding_fidelity", "evaluate", "flops_per_token", "kl_top1",
           "log_probs", "mean_pooled", "nonzeros", "perplexity", "speed", "to_markdown"]
