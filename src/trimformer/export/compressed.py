"""Sparse checkpoints in the compressed-tensors layouts: `sparse-bitmask` (any sparsity) and `sparse-24-bitmask` (2:4).

Per compressed weight `<layer>.weight` the file holds `<layer>.<part>` (as compressed-tensors <= 0.14 writes and
reads them; `<layer>.weight.<part>`, which trimformer wrote before, is still read):
  sparse-bitmask:    .shape (2,) int64, .compressed (nnz,) values in row-major order,
                     .bitmask (rows, ceil(cols/8)) uint8 (bit j of a row set = weight j kept, little-endian),
                     .row_offsets (rows,) int64 (index in .compressed where each row starts);
  sparse-24-bitmask: .shape (2, 1), .bitmask as above, .compressed (rows, cols/2): the two kept values of every four.
config.json gets `quantization_config = {quant_method: compressed-tensors, sparsity_config: {...}}` built with the
library's own config classes. compressed-tensors >= 0.19 keeps these configs and the bit-packing helpers but no
longer ships the sparse compressors (and serving engines dropped the sparse kernels), so writing and reading the
tensors is done here with those helpers; `load_compressed` reads the checkpoint back into a dense model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.config import BitmaskConfig, CompressionFormat, Sparse24BitMaskConfig
from compressed_tensors.utils.helpers import pack_bitmasks, unpack_bitmasks
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import atomic_dir
from ..models import anatomy_of
from ..models.load import model_class
from .hf import add_legacy_fields

FORMATS = (CompressionFormat.sparse_bitmask.value, CompressionFormat.sparse_24_bitmask.value)
PARTS = ("shape", "compressed", "bitmask", "row_offsets")


def is_24(W: torch.Tensor) -> bool:
    """True when every group of 4 consecutive entries of each row has at most 2 non-zeros."""
    return W.shape[-1] % 4 == 0 and bool(((W.reshape(W.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def compress(W: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """One (rows, cols) weight -> its compressed tensors (suffixes of PARTS)."""
    rows, cols = W.shape
    keep = W != 0
    out = {"shape": torch.tensor([rows, cols]), "bitmask": pack_bitmasks(keep)}  # int64, as compressed-tensors
    if fmt == CompressionFormat.sparse_24_bitmask.value:
        # exactly 2 per group of 4: pad groups with fewer non-zeros by keeping (zero) entries, first ones first
        g = keep.reshape(rows, cols // 4, 4)  # (rows, groups, 4)
        order = torch.sort(g.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :2]
        g2 = torch.zeros_like(g).scatter_(-1, order.sort(-1).values, True)
        out["bitmask"] = pack_bitmasks(g2.reshape(rows, cols))
        out["compressed"] = W[g2.reshape(rows, cols)].reshape(rows, cols // 2).contiguous()
        out["shape"] = out["shape"].reshape(-1, 1)  # the 2:4 layout stores the shape as a column
    else:
        out["compressed"] = W[keep].contiguous()  # (nnz,) row-major
        counts = keep.sum(1, dtype=torch.int64)
        out["row_offsets"] = torch.cumsum(counts, 0) - counts
    return out


def decompress(parts: dict[str, torch.Tensor], fmt: str) -> torch.Tensor:
    rows, cols = (int(x) for x in parts["shape"].flatten())
    mask = unpack_bitmasks(parts["bitmask"], [rows, cols])  # (rows, cols) bool
    W = torch.zeros(rows, cols, dtype=parts["compressed"].dtype)
    W[mask] = parts["compressed"].flatten()
    return W


def save_compressed(model: nn.Module, out: str | os.PathLike, *, fmt: str = "auto", tokenizer: Any = None,
                    overwrite: bool = False) -> Path:
    """Write `model` with its prunable projections compressed; `fmt`: auto (2:4 when every one is 2:4), or a FORMATS name."""
    if fmt not in ("auto", *FORMATS):
        raise ValueError(f"format {fmt!r}: choose auto, {' or '.join(FORMATS)}")
    targets = {p.module: name for name, p in anatomy_of(model).projections()}
    weights = {name: m.weight.detach() for m, name in targets.items()}
    all_24 = all(is_24(W) for W in weights.values())
    if fmt == "auto":
        fmt = FORMATS[1] if all_24 else FORMATS[0]
    elif fmt == FORMATS[1] and not all_24:
        bad = next(n for n, W in weights.items() if not is_24(W))
        raise ValueError(f"format {fmt}: {bad} is not 2:4 sparse; prune with pattern 2:4 or use {FORMATS[0]}")
    zeros = sum((W == 0).sum().item() for W in weights.values())
    total = sum(W.numel() for W in weights.values())
    cfg_cls = Sparse24BitMaskConfig if fmt == FORMATS[1] else BitmaskConfig
    sparsity_config = cfg_cls(global_sparsity=zeros / total, sparsity_structure="2:4" if all_24 else "unstructured",
                              targets=sorted(weights), ignore=[]).model_dump()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for f in sorted(tmp.glob("*.safetensors")):
            state = load_file(f)
            for key in [k for k in state if k.endswith(".weight") and k[: -len(".weight")] in weights]:
                module = key[: -len(".weight")]
                for part, t in compress(state.pop(key), fmt).items():
                    state[f"{module}.{part}"] = t
            save_file(state, f, metadata={"format": "pt"})
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "compressed-tensors",  # no top-level format: that means quantization
                                      "sparsity_config": sparsity_config}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        add_legacy_fields(tmp / "config.json")
    return Path(out)


def load_compressed(path: str | os.PathLike) -> nn.Module:
    """A compressed-tensors sparse checkpoint (sparse-bitmask / sparse-24-bitmask) back as a dense model, eval mode."""
    from transformers import AutoConfig

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    q = cfg.pop("quantization_config", None) or {}
    fmt = (q.get("sparsity_config") or {}).get("format")
    if fmt not in FORMATS:
        raise ValueError(f"{str(path)!r} is not a sparse compressed-tensors checkpoint (sparsity format {fmt!r})")
    config = AutoConfig.for_model(**cfg)
    model = model_class(config)(config)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    dense: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    targets = set((q.get("sparsity_config") or {}).get("targets") or [])
    for key, t in state.items():
        base, _, part = key.rpartition(".")
        module = base[: -len(".weight")] if base.endswith(".weight") else base
        if part in PARTS and (module in targets or base.endswith(".weight")):
            groups.setdefault(f"{module}.weight", {})[part] = t
        else:
            dense[key] = t
    for key, parts in groups.items():
        dense[key] = decompress(parts, fmt)
    missing, unexpected = model.load_state_dict(dense, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if "lm_head" not in k]
    if missing or unexpected:
        raise ValueError(f"{str(path)!r}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()
