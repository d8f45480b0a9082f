"""Architecture adapters: each maps one Hugging Face family onto an Anatomy."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .anatomy import MLP, Anatomy, Attention, Block, PostNorm, Proj, count_parameters

Adapter = Callable[[nn.Module], Anatomy]
ADAPTERS: dict[str, Adapter] = {}  # model_type -> adapter
FAMILIES: dict[str, list[str]] = {}  # family -> model_types


def adapter(family: str, model_types: list[str]) -> Callable[[Adapter], Adapter]:
    def deco(fn: Adapter) -> Adapter:
        for t in model_types:
            ADAPTERS[t] = fn
        FAMILIES[family] = model_types
        return fn

    return deco


class UnsupportedModelError(ValueError):
    pass


def anatomy_of(model: nn.Module) -> Anatomy:
    """The Anatomy of a loaded Hugging Face model; a clear error for families without an adapter."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        supported = "; ".join(f"{fam} ({', '.join(FAMILIES[fam])})" for fam in sorted(FAMILIES))
        raise UnsupportedModelError(
            f"no trimformer adapter for model_type {model_type!r} ({type(model).__name__}). "
            f"Supported families: {supported}. Adding one is a small file in trimformer/models/."
        )
    return ADAPTERS[model_type](model)


def submodule_or_none(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def find_base(model: nn.Module, candidates: list[str]) -> str:
    """Dotted prefix of the backbone inside a task wrapper ('' when the model is the backbone)."""
    for path in candidates:
        if path and submodule_or_none(model, path) is not None:
            return path
    return ""


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def proj(model: nn.Module, path: str, transposed: bool = False) -> Proj:
    return Proj(model.get_submodule(path), path, transposed)


def removed(module: nn.Module) -> bool:
    """A sublayer that structured pruning replaced by a stand-in adding 0 (see structure/surgery.py)."""
    return bool(getattr(module, "trimformer_removed", False))


def heads_of(model: nn.Module, path: str, head_dim: int, default: int, inputs: bool = False) -> int:
    """Heads read from a projection's shape (pruned models have fewer than the config's `default`)."""
    w = getattr(model.get_submodule(path), "weight", None)
    if w is None:
        return default
    conv1d = type(model.get_submodule(path)).__name__ == "Conv1D"  # stored (in, out)
    size = w.shape[0 if inputs == conv1d else 1]
    return size // head_dim


def tied(model: nn.Module, embed: nn.Module, head: nn.Module | None) -> bool:
    return head is not None and getattr(head, "weight", None) is getattr(embed, "weight", None)


# Explicit imports fill ADAPTERS (no auto-discovery).
from . import bert, dinov2, gemma3, gpt2, llama, opt, vit  # noqa: E402,F401

__all__ = [
    "ADAPTERS",
    "FAMILIES",
    "MLP",
    "Anatomy",
    "Attention",
    "Block",
    "PostNorm",
    "Proj",
    "UnsupportedModelError",
    "anatomy_of",
    "count_parameters",
]
