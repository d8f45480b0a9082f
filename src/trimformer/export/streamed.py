"""Write a streamed model (models/offload.py) as a sharded Hugging Face checkpoint without ever holding it.

One shard per block and one per run of other parts (embeddings; final norm and head), plus
model.safetensors.index.json. A block saved during the run already lies in the scratch folder under its
checkpoint keys: when the scratch folder is the output folder (what `trimformer prune` does), finishing only
renames it; a part never changed is copied from the source checkpoint one tensor at a time.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .. import parallel
from ..io import atomic_dir, write_files
from ..models import offload, shards
from ..models.offload import Offload, Unit
from .hf import add_legacy_fields
from .structured import differences

Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def _plan(off: Offload) -> list[list[tuple[Unit, str]]]:
    """Units (with their module paths now) grouped into shards: each block alone, other parts by runs."""
    paths = off.paths()
    groups: list[list[tuple[Unit, str]]] = []
    for u in off.units:
        if id(u.module) not in paths:
            continue  # removed from the model
        if u.is_block or not groups or groups[-1][0][0].is_block:
            groups.append([])
        groups[-1].append((u, paths[id(u.module)]))
    return groups


def _layouts(groups: list[list[tuple[Unit, str]]]) -> list[tuple[Layout, dict[str, tuple[Unit, str]]]]:
    """Per shard: key -> (dtype, shape), and key -> (unit, local name); tied parameters written once."""
    seen: set[str] = set()
    out = []
    for group in groups:
        layout: Layout = {}
        where: dict[str, tuple[Unit, str]] = {}
        for u, path in group:
            for local, p in offload.unit_params(u):
                key = u.key(local, path)
                if key in seen:
                    continue
                seen.add(key)
                layout[key] = (p.dtype, tuple(p.shape))
                where[key] = (u, local)
        if layout:
            out.append((layout, where))
    return out


def write_checkpoint(model: torch.nn.Module, folder: str | os.PathLike) -> dict[str, str]:
    """Write every tensor of the streamed `model` into `folder` (shards + index); returns key -> shard file.
    Shards already in `folder` (its scratch folder) are renamed, not copied."""
    off = offload.offload_of(model)
    folder = Path(folder)
    off.sweep()
    plans = _layouts(_plan(off))
    weight_map: dict[str, str] = {}
    total = 0
    for i, (layout, where) in enumerate(plans):
        name = f"model-{i + 1:05d}-of-{len(plans):05d}.safetensors"
        units = {id(u): u for u, _ in where.values()}
        u = next(iter(units.values()))
        same = len(units) == 1 and u.file is not None and u.file.parent.resolve() == folder.resolve() and \
            {k: (e.dtype, e.shape) for k, e in shards.read_header(u.file).items()} == layout
        if same:  # the block as saved during the run: a rename
            os.replace(u.file, folder / name)
            off.point(u, folder / name, u.local_of)
        else:
            with shards.ShardWriter(folder / name, layout) as w:
                for key, (unit, local) in where.items():
                    e = unit.saved[local] if unit.saved is not None else off.entries[unit.keys[local]]
                    w.put(key, shards.read(e).to(layout[key][0]))
        for key, (dtype, shape) in layout.items():
            weight_map[key] = name
            total += dtype.itemsize * int(torch.Size(shape).numel())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / shards.INDEX).write_text(json.dumps(index, indent=2))
    for left in list(folder.glob(".unit-*.safetensors")):
        left.unlink()
    shutil.rmtree(folder / ".activations", ignore_errors=True)
    return weight_map


def write_streamed(model: torch.nn.Module, folder: str | os.PathLike, *, tokenizer: Any = None,
                   extra_files: dict[str, Any] | None = None) -> Path:
    """The whole checkpoint folder of a streamed model: tensors, config, generation config, tokenizer, extras."""
    folder = Path(folder)
    if any(differences(model).values()):
        raise ValueError("a streamed model whose shapes changed cannot be written yet (structured pruning does "
                         "not stream): use --offload none")
    if parallel.is_main():
        write_checkpoint(model, folder)
        model.config.save_pretrained(folder)
        add_legacy_fields(folder / "config.json")
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(model, "can_generate", lambda: False)():
            gen.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        write_files(folder, extra_files)
    parallel.barrier()
    return folder


def save_streamed(model: torch.nn.Module, out: str | os.PathLike, *, tokenizer: Any = None,
                  extra_files: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """`export.save` for a streamed model: written atomically (a failed write leaves nothing)."""
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_streamed(model, tmp, tokenizer=tokenizer, extra_files=extra_files)
    offload.offload_of(model).rebase(tmp, out)
    return out
