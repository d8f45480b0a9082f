"""LoRA adapters (via `peft`) on the block projections, merged back at the end without filling the masks.

A masked layer's adapter acts as W0*M + (B A s)*M: a forward hook removes the part of the low-rank
update that falls on pruned weights (recomputed in backward, so it costs compute, not memory). The base
weights are frozen, so their zeros *are* the mask: nothing is stored per weight. Merging then re-masking
gives exactly the logits the adapter model had.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..models import Anatomy

ADAPTER = "default"


@dataclass
class LoRA:
    """Adapters injected in place into `model`; `merge_()` or `discard_()` takes them out again."""

    model: nn.Module
    peft_model: nn.Module
    masked: list[str]  # base parameter names whose zeros are kept through the merge
    flags: dict[str, bool]  # requires_grad of every parameter before injection
    layers: list[str] = field(default_factory=list)  # module names holding an adapter
    hooks: list = field(default_factory=list)

    @torch.no_grad()
    def merge_(self) -> nn.Module:
        """Merge layer by layer (one mask alive at a time), then take the adapters out."""
        for h in self.hooks:
            h.remove()
        for name in self.layers:
            layer = self.model.get_submodule(name)
            W = layer.base_layer.weight
            keep = W != 0 if f"{name}.weight" in self.masked else None
            layer.merge(adapter_names=[ADAPTER])
            if keep is not None:
                W.mul_(keep)
        self.peft_model.unload()  # (the merged base layers stay)
        self._restore_flags()
        return self.model

    def discard_(self) -> nn.Module:
        for h in self.hooks:
            h.remove()
        self.peft_model.unload()
        self._restore_flags()
        return self.model

    def _restore_flags(self) -> None:
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.flags.get(name, p.requires_grad))
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in vars(self.model):
                delattr(self.model, attr)


def attach(model: nn.Module, anatomy: Anatomy, masked: set[str], rank: int, alpha: float,
           only: set[str] | None = None) -> LoRA:
    """Inject rank-`rank` adapters into every block projection (or those named in `only`); everything else
    is frozen meanwhile.

    `masked`: parameter names ('...up_proj.weight') whose zeros must stay zeros (the masks already applied).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # peft is a dependency; a broken install gets a fix, not a traceback
        raise ImportError("LoRA needs the 'peft' package: pip install peft") from e

    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    projs = {name: proj for name, proj in anatomy.projections() if only is None or name in only}
    transposed = {p.transposed for p in projs.values()}
    if len(transposed) > 1:
        raise ValueError("LoRA over a mix of Linear and Conv1D projections is not supported; use lora_rank=None")
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=sorted(projs),
                     fan_in_fan_out=transposed == {True})
    peft_model = get_peft_model(model, cfg)
    handle = LoRA(model, peft_model, [], flags, sorted(projs))
    for name, proj in projs.items():
        if f"{name}.weight" not in masked:
            continue
        handle.masked.append(f"{name}.weight")
        layer = model.get_submodule(name)  # now a peft LoRA layer wrapping the original as base_layer
        handle.hooks.append(layer.register_forward_hook(_masked_update(proj.transposed)))
    return handle


def _masked_update(transposed: bool):
    """Forward hook: out - x @ ((B A s) * pruned)^T, i.e. the adapter never writes into pruned weights."""

    def outside(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, W0: torch.Tensor) -> torch.Tensor:
        D = (B @ A) * s  # (out, in)
        if transposed:  # GPT-2 Conv1D keeps (in, out) weights
            return x @ D.t().masked_fill(W0 != 0, 0.0)
        return F.linear(x, D.masked_fill(W0 != 0, 0.0))

    def hook(layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if ADAPTER not in layer.lora_A or getattr(layer, "merged", False) or layer.disable_adapters:
            return out
        x = args[0].to(layer.lora_A[ADAPTER].weight.dtype)
        A, B = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight  # (r, in), (out, r)
        fix = checkpoint(outside, x, A, B, layer.scaling[ADAPTER], layer.base_layer.weight, use_reentrant=False)
        return out - fix.to(out.dtype)

    return hook
