"""Quality and cost measurement against the dense model, in one JSON schema."""

from .quality import embedding_fidelity, kl_top1, mean_pooled, perplexity

__all__ = ["embedding_fidelity", "kl_top1", "mean_pooled", "perplexity"]
