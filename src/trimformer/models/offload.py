"""Streaming: a model whose weights stay in their safetensors files until a part of it runs.

    model = offload.stream("path/to/checkpoint", dtype=torch.bfloat16, device="cpu", scratch="work/")
    anatomy = anatomy_of(model)                           # the skeleton: every parameter on the meta device
    with offload.onload(anatomy.blocks[3].module, save=True):
        ...                                               # block 3 is real on `device`; on exit its tensors
                                                          # are written to the scratch folder and freed
    model(input_ids=ids)                                  # any forward works: each unit is read just for its
                                                          # own forward and freed after it

A *unit* is what is materialised at once: each block (everything below it), and every other module that owns
parameters directly (embeddings, final norm, head). A unit is read from the source checkpoint, or, once saved,
from its shard in the scratch folder, one tensor at a time (models/shards.py): peak memory is one unit plus
whatever the caller computes on it. Code that reads or edits weights outside a forward wraps that in
`onload(module, save=...)`, which is a no-op on an ordinary model, so a method written this way runs on both.

What a later step (or a method family that changes shapes) can rely on: a saved unit keeps its new shapes (the
meta placeholders follow them), units are tracked by module identity (a block that moves in the list is still
itself), and whole-model forwards need nothing special.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import parallel
from . import shards


class StreamError(ValueError):
    """A checkpoint that cannot be streamed (not safetensors, tensors that need converting on load)."""


@dataclass(eq=False)
class Unit:
    """One materialisable part of a streamed model: `module` and where each of its parameters comes from."""

    module: nn.Module
    path: str  # module path when streaming began
    keys: dict[str, str]  # local parameter name -> source checkpoint key
    is_block: bool
    saved: dict[str, shards.Entry] | None = None  # local name -> entry in its scratch shard, once saved
    file: Path | None = None  # that shard ...
    local_of: dict[str, str] = field(default_factory=dict)  # ... and its keys -> local names
    pins: int = 0
    by_forward: bool = False  # materialised by a forward hook (freed when that forward ends)

    @property
    def loaded(self) -> bool:
        return any(not p.is_meta for _, p in unit_params(self))

    def key(self, local: str, path: str | None = None) -> str:
        """The checkpoint key a parameter is written under, the unit being at module `path` now: its source key
        while the unit is where streaming found it (so renamed checkpoints keep their names), else path.local."""
        path = self.path if path is None else path
        return self.keys[local] if path == self.path and local in self.keys else f"{path}.{local}"


def unit_params(unit: Unit) -> Iterator[tuple[str, nn.Parameter]]:
    """(local name, parameter) of a unit: a block's whole module, else only the module's own parameters."""
    if unit.is_block:
        yield from unit.module.named_parameters(remove_duplicate=False)
    else:
        yield from ((n, p) for n, p in unit.module._parameters.items() if p is not None)


def _set(module: nn.Module, local: str, param: nn.Parameter) -> None:
    owner, _, leaf = local.rpartition(".")
    (module.get_submodule(owner) if owner else module)._parameters[leaf] = param


@dataclass(eq=False)
class Offload:
    """The bookkeeping of one streamed model (attached as `model.trimformer_offload`)."""

    source: Path
    entries: dict[str, shards.Entry]  # source key -> where it lies
    device: torch.device
    scratch: Path
    units: list[Unit] = field(default_factory=list)
    activation_budget: int = 2**62  # bytes of calibration activations kept in memory; the rest spill to disk
    reads: int = 0  # bytes read from disk so far (a test and a benchmark figure)
    spilled: int = 0  # bytes of activations written to disk so far
    activation_bytes: int = 0  # bytes of activations in memory now
    hold: int = 0  # > 0: units materialised by forwards stay until held() ends
    model: weakref.ref = field(default=lambda: None, repr=False)  # the streamed model (weakly)
    _by_id: dict[int, Unit] = field(default_factory=dict, repr=False)

    def unit_of(self, module: nn.Module) -> Unit | None:
        u = self._by_id.get(id(module))
        return u if u is not None and u.module is module else None

    @torch.no_grad()
    def load(self, unit: Unit) -> None:
        """Materialise every parameter of `unit` on the device, in its placeholder's dtype."""
        for local, meta in list(unit_params(unit)):
            if not meta.is_meta:
                continue
            entry = unit.saved[local] if unit.saved is not None else self.entries[unit.keys[local]]
            t = shards.read(entry)
            self.reads += entry.nbytes
            t = t.to(device=self.device, dtype=meta.dtype)
            if tuple(t.shape) != tuple(meta.shape):
                raise StreamError(f"{unit.path}.{local}: {tuple(t.shape)} on disk, {tuple(meta.shape)} in the model")
            _set(unit.module, local, nn.Parameter(t, requires_grad=meta.requires_grad))

    def release(self, unit: Unit) -> None:
        """Drop the unit's tensors: meta placeholders of their current shapes take their place."""
        for local, p in list(unit_params(unit)):
            if not p.is_meta:
                _set(unit.module, local, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad))
        unit.by_forward = False

    @torch.no_grad()
    def save(self, unit: Unit) -> None:
        """Write the unit's current tensors to its scratch shard under their checkpoint keys (process 0 writes;
        the others wait, then read it too)."""
        path = self.scratch / f".unit-{self.units.index(unit):05d}.safetensors"
        where = self.paths().get(id(unit.module), unit.path)
        local_of = {unit.key(local, where): local for local, _ in unit_params(unit)}
        if parallel.is_main():
            tmp = path.with_name(path.name + ".tmp")
            shards.write(tmp, {k: p for k, (_, p) in zip(local_of, unit_params(unit))})
            os.replace(tmp, path)
        parallel.barrier()
        self.point(unit, path, local_of)

    def point(self, unit: Unit, path: Path, local_of: dict[str, str]) -> None:
        """Read `unit` from the shard `path` (keys -> local names: `local_of`) from now on."""
        unit.saved = {local_of[k]: e for k, e in shards.read_header(path).items()}
        unit.file, unit.local_of = path, local_of

    def paths(self) -> dict[int, str]:
        """id(module) -> its module path in the model now."""
        model = self.model()
        return {} if model is None else {id(m): p for p, m in model.named_modules()}

    def rebase(self, old: Path, new: Path) -> None:
        """Saved shards moved from folder `old` to `new` (the output folder renamed into place)."""
        for u in self.units:
            if u.file is not None and u.file.parent == old:
                self.point(u, new / u.file.name, u.local_of)
        if self.scratch == old:
            self.scratch = new

    def sweep(self) -> None:
        """Free every unit a forward materialised (normally each frees itself when its forward ends)."""
        for u in self.units:
            if u.by_forward and u.pins == 0:
                self.release(u)

    def resident_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for u in self.units for _, p in unit_params(u) if not p.is_meta)


def offload_of(model: nn.Module) -> Offload | None:
    return getattr(model, "trimformer_offload", None)


def streamed(model: nn.Module) -> bool:
    return offload_of(model) is not None


_OWNER: weakref.WeakValueDictionary[int, Offload] = weakref.WeakValueDictionary()  # id(unit module) -> its Offload


@contextlib.contextmanager
def onload(module: nn.Module, save: bool = False) -> Iterator[nn.Module]:
    """Keep `module` (a unit of a streamed model: a block, an embedding, the head) materialised inside; with
    `save`, write its tensors to the scratch folder on a normal exit (a failed step writes nothing). Outside a
    streamed model this does nothing."""
    off = _OWNER.get(id(module))
    unit = off.unit_of(module) if off is not None else None
    if unit is None:
        yield module
        return
    off.sweep()
    if not unit.loaded:
        off.load(unit)
    unit.by_forward = False
    unit.pins += 1
    try:
        yield module
        if save:
            off.save(unit)
    finally:
        unit.pins -= 1
        if unit.pins == 0:
            off.release(unit)


def device_of(model: nn.Module) -> torch.device:
    """Where the model computes: the streaming device, else the device of its first parameter."""
    off = offload_of(model)
    if off is not None:
        return off.device
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (meta placeholders included)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _hooks(off: Offload):
    def before(mod: nn.Module, _args) -> None:
        u = off.unit_of(mod)
        if u is not None and not u.loaded:
            off.load(u)
            u.by_forward = True

    def after(mod: nn.Module, _args, _out) -> None:
        u = off.unit_of(mod)
        if u is not None and u.by_forward and u.pins == 0 and off.hold == 0:
            off.release(u)

    return before, after


def _checkpoint_keys(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Source key -> parameter name, through the renamings transformers applies on load (none for most models).
    A key that needs more than a renaming (fused or split tensors) cannot be streamed."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # an older transformers: names are the keys
        return {k: k for k in keys}
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta = dict(model.state_dict())
    out = {}
    for k in keys:
        name, converted = rename_source_key(k, renamings, converters, model.base_model_prefix, meta)
        if converted is not None:
            raise StreamError(f"{k!r} is converted (not only renamed) when transformers loads this checkpoint; "
                              "streaming cannot do that: use --offload none")
        out[k] = name
    return out


def skeleton(folder: str | os.PathLike, dtype: torch.dtype, trust_remote_code: bool = False,
             gguf_file: str | None = None) -> nn.Module:
    """The model of `folder` (or of a GGUF file in it) with every parameter on the meta device (buffers real),
    as from_pretrained builds it: nothing is read but the config."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from .load import model_class

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, **kw)
    if getattr(config, "quantization_config", None) is not None:  # a GGUF's: the weights load as plain floats
        del config.quantization_config
    cls = model_class(config)
    if getattr(config, "auto_map", None) and trust_remote_code:
        import transformers

        auto = next((k for k in config.auto_map if k.startswith("AutoModel")), "AutoModelForCausalLM")
        cls = getattr(transformers, auto)
    with init_empty_weights(include_buffers=False):
        if cls.__name__.startswith("Auto"):
            model = cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        else:
            model = cls._from_config(config, dtype=dtype)
    model.tie_weights()
    return model.eval()


def stream(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
           scratch: str | os.PathLike, blocks_path: str | None = None, trust_remote_code: bool = False) -> nn.Module:
    """A streamed model of the safetensors checkpoint in `folder` (see the module docstring).

    `scratch`: a folder for the tensors of saved units (the output folder of a pruning run, so that finishing
    it moves files instead of copying them). Every parameter must come from the checkpoint and every tensor of
    the checkpoint must have a place (the rules of `load`)."""
    from . import anatomy_of
    from .load import ModelLoadError

    folder, scratch, device = Path(folder), Path(scratch), torch.device(device)
    try:
        entries = shards.folder_index(folder)
    except shards.ShardError as e:
        raise StreamError(str(e)) from None
    model = skeleton(folder, dtype, trust_remote_code)
    scratch.mkdir(parents=True, exist_ok=True)
    blocks_path = blocks_path or anatomy_of(model).blocks_path
    name_of = _checkpoint_keys(model, list(entries))
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers())
    key_of: dict[int, str] = {}  # id(parameter) -> source key (tied parameters share one)
    unexpected, mismatched = [], []
    for key, name in name_of.items():
        target = params.get(name, buffers.get(name))
        if target is None:
            unexpected.append(key)
        elif tuple(target.shape) != entries[key].shape:
            mismatched.append(key)
        elif name in params:
            key_of[id(target)] = key
        else:  # a persistent buffer: small, read now
            with torch.no_grad():
                target.copy_(shards.read(entries[key]).to(target.dtype))
    missing = [n for n, p in params.items() if id(p) not in key_of]
    problems = [f"{len(v)} tensor(s) {what}: {', '.join(sorted(v)[:4])}" for v, what in
                ((missing, "missing"), (unexpected, "unexpected"), (mismatched, "of another shape")) if v]
    if problems:
        raise ModelLoadError(f"{str(folder)!r} does not match its config ({'; '.join(problems)}); loading it would "
                             "leave those weights random: fix config.json or the weight files")
    for b_name, b in list(model.named_buffers()):
        owner, _, leaf = b_name.rpartition(".")
        (model.get_submodule(owner) if owner else model)._buffers[leaf] = b.to(device)
    off = Offload(folder, entries, device, scratch)
    block_list = model.get_submodule(blocks_path)
    blocks = {id(m) for m in block_list}
    inside = re.compile(re.escape(blocks_path) + r"\.\d+\.")
    for path, module in model.named_modules():
        if id(module) in blocks:
            keys = {n: key_of[id(p)] for n, p in module.named_parameters(remove_duplicate=False)}
            unit = Unit(module, path, keys, is_block=True)
        elif module._parameters and not inside.match(path + "."):
            keys = {n: key_of[id(p)] for n, p in module._parameters.items() if p is not None}
            unit = Unit(module, path, keys, is_block=False)
        else:
            continue
        off.units.append(unit)
        off._by_id[id(module)] = unit
        _OWNER[id(module)] = off
    before, after = _hooks(off)
    for u in off.units:
        u.module.register_forward_pre_hook(before, prepend=True)
        u.module.register_forward_hook(after, always_call=True)
    model.trimformer_offload = off
    off.model = weakref.ref(model)
    return model


class Activations:
    """Calibration activations, one tensor per batch (a list for calibrate.py): kept in memory while the
    streamed run's budget (`Offload.activation_budget`) allows, the rest in files of the scratch folder."""

    def __init__(self, off: Offload | None):
        self.off = off
        self.items: list[torch.Tensor | Path] = []
        self._kept = [0]  # bytes of this store held in memory (a box the finalizer can read)
        if off is not None:
            weakref.finalize(self, _free, off, self.items, self._kept)

    def append(self, t: torch.Tensor) -> None:
        off, n = self.off, t.numel() * t.element_size()
        if off is None or off.activation_bytes + n <= off.activation_budget:
            self.items.append(t)
            self._kept[0] += n
            if off is not None:
                off.activation_bytes += n
            return
        folder = off.scratch / ".activations"
        folder.mkdir(exist_ok=True)
        path = folder / f"{next(_SERIAL):08d}.safetensors"
        shards.write(path, {"x": t})
        off.spilled += n
        self.items.append(path)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.items[i]
        if isinstance(x, Path):
            return shards.read(shards.read_header(x)["x"]).to(self.off.device)
        return x

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self.items)))


_SERIAL = itertools.count()


def _free(off: Offload, items: list, kept: list[int]) -> None:
    off.activation_bytes -= kept[0]
    for x in items:
        if isinstance(x, Path):
            x.unlink(missing_ok=True)


def activations(model: nn.Module) -> list | Activations:
    """A store for one stream of calibration activations: a plain list unless `model` is streamed."""
    off = offload_of(model)
    return [] if off is None else Activations(off)


@contextlib.contextmanager
def held(model: nn.Module) -> Iterator[None]:
    """Units that forwards materialise stay materialised until the end of this block (for repeated forwards that
    stop early, such as capturing the first block's inputs batch by batch: the embeddings are read once)."""
    off = offload_of(model)
    if off is None:
        yield
        return
    off.hold += 1
    try:
        yield
    finally:
        off.hold -= 1
        if off.hold == 0:
            off.sweep()
