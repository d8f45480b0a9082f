"""Block-by-block calibration (DESIGN.md "calibrate").

Capture the inputs of block 0, then for each block: let the method collect what it needs from
the block's projections, let it prune the block, and run the *pruned* block to make the inputs
of the next one. Only one block's statistics live at a time.

The same loop streams a model whose weights stay on disk (models/offload.py): each block is read just before
it is yielded and written to the output and freed once its outputs are computed, and the activations between
blocks spill to disk past the run's budget. With several processes (parallel.py) each takes its share of the
windows and the statistics below (`collect`; weights/sequential.py for Hessians) are summed across them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import parallel
from .models import Anatomy, Block, Proj
from .models.offload import activations, device_of, dtype_of, held, onload
from .progress import bar


@dataclass
class LayerStats:
    """What one projection saw: token count, per-input-channel sum of squares, optional X^T X."""

    n: int = 0
    sq: torch.Tensor | None = None  # (in,) sum over tokens of x^2
    H: torch.Tensor | None = None  # (in, in) sum over tokens of x x^T

    @property
    def norm(self) -> torch.Tensor:
        """||X_j||_2 per input channel (the Wanda activation term)."""
        return self.sq.sqrt()

    @property
    def mean_sq(self) -> torch.Tensor:
        return self.sq / max(self.n, 1)


class _Stop(Exception):
    pass


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """The dtype calibration forwards run in: None (the model's own) or torch.bfloat16.

    'auto' picks bf16 where the hardware multiplies bf16 natively (CPUs with AMX or AVX512-BF16, CUDA GPUs
    with bf16), where it is 4-7x faster than fp32; statistics are always accumulated in fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        native = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() or \
            getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        return torch.bfloat16 if native else None
    return None


@contextlib.contextmanager
def _bf16_inputs() -> Iterator[None]:
    """fp32 matmuls on CPU round their inputs to bf16 and accumulate in fp32 (no-op where unsupported)."""
    mm = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    old = getattr(mm, "fp32_precision", None)
    if old is None:
        yield
        return
    mm.fp32_precision = "bf16"
    try:
        yield
    finally:
        mm.fp32_precision = old


@dataclass
class Shortcut:
    """A sublayer (attention or MLP module) whose output is its output projection applied to an input that
    no longer changes: while installed, calling the sublayer runs only `out_proj` on the cached input of the
    current batch (`batch`), so a re-run of the block skips the sublayer's unchanged inside.

    Valid only while everything upstream of `out_proj` inside the sublayer stays as it was when `inputs` were
    captured; `rest`: the other items of the sublayer's tuple output (all None), or None for a tensor output.
    """

    module: nn.Module
    out_proj: nn.Module
    inputs: list[torch.Tensor]
    rest: tuple | None
    batch: int = 0

    def __call__(self, *_args: Any, **_kwargs: Any) -> Any:
        y = self.out_proj(self.inputs[self.batch])
        return y if self.rest is None else (y, *self.rest)


@contextlib.contextmanager
def shortcuts_installed(shortcuts: list[Shortcut]) -> Iterator[None]:
    """Route each shortcut's sublayer through it (an instance `forward` shadows the class's) while inside."""
    saved = []
    try:
        for s in shortcuts:
            saved.append((s.module, s.module.__dict__.get("forward")))
            s.module.forward = s
        yield
    finally:
        for module, old in saved:
            if old is None:
                del module.forward
            else:
                module.forward = old


@dataclass
class BlockCalib:
    """One block and its calibration inputs (one entry per calibration batch)."""

    block: Block
    inputs: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    compute_dtype: torch.dtype | None = None  # autocast dtype of the forwards (resolve_precision)
    dense: nn.Module | None = None  # with dense targets: an unpruned copy of the block ...
    dense_inputs: list[torch.Tensor] | None = None  # ... and the inputs the dense model gives it
    shortcuts: list[Shortcut] = field(default_factory=list)  # sublayers whose inside is final (see Shortcut)
    store: Any = list  # () -> a list-like for one stream of activations (models.offload.activations)
    tokens: int | None = None  # calibration tokens that reach the block, every process' together (None: unknown)
    _dense_x: dict[nn.Module, list[torch.Tensor]] | None = field(default=None, repr=False)
    _dense_out: list[torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.kwargs = [for_block(kw, self.block) for kw in self.kwargs]

    def compute(self) -> contextlib.AbstractContextManager:
        """The context every calibration forward of this block runs in (bf16 autocast, or nothing)."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        device = self.inputs[0].device.type if self.inputs else "cpu"
        return torch.autocast(device, dtype=self.compute_dtype)

    def gram(self, X: torch.Tensor, Y: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """X^T X (or X^T Y) for X (tokens, in), accumulated and returned in fp32 (outside autocast); with `out`,
        added to it in place (one fused multiply-add, no temporary).

        A bf16 *result* would round every entry of X^T X to 8 bits; for inputs with one dominant direction
        (attention sinks, massive activations) that error exceeds the damping and the small eigenvalues OBS
        relies on, so the Hessian turns indefinite. With bf16 forwards on a CPU, the product instead rounds
        only the *inputs* to bf16 and accumulates in fp32 (oneDNN's bf16 fp32-matmul mode, about 3x faster):
        the result is the exact Gram matrix of the rounded inputs, so it stays positive semi-definite.
        """
        with torch.autocast(X.device.type, enabled=False):
            X = X.float()
            Y = X if Y is None else Y.reshape(X.shape).float()
            mode = _bf16_inputs() if self.compute_dtype == torch.bfloat16 and X.device.type == "cpu" \
                else contextlib.nullcontext()
            with mode:
                return X.t() @ Y if out is None else out.addmm_(X.t(), Y)

    def twin(self, module: nn.Module) -> nn.Module:
        """The dense copy's counterpart of `module` (a submodule of this block); needs the dense stream."""
        if self.dense is None:
            raise ValueError("no dense stream: calibrate.blocks(..., dense_targets=True) carries one")
        path = next(q for q, m in self.block.module.named_modules() if m is module)
        return self.dense.get_submodule(path)

    @torch.no_grad()
    def dense_projection_inputs(self) -> dict[nn.Module, list[torch.Tensor]]:
        """The input of every projection of the dense copy, per batch, keyed by the dense copy's module.

        One forward of the dense copy, cached for the block (with its outputs, which `run(dense=True)` then
        returns); inputs are kept in the compute dtype, which is what the bf16 Gram products read anyway.
        """
        if self.dense is None:
            raise ValueError("no dense stream: calibrate.blocks(..., dense_targets=True) carries one")
        if self._dense_x is None:
            twins = [self.twin(p.module) for p in self.block.projections().values()]
            xs: dict[nn.Module, list[torch.Tensor]] = {m: self.store() for m in twins}

            def keep(mod: nn.Module, args: tuple) -> None:
                x = args[0]
                xs[mod].append(x if self.compute_dtype is None else x.to(self.compute_dtype))

            hooks = [m.register_forward_pre_hook(keep) for m in twins]
            try:
                self._dense_out = self._forward(self.dense, self.dense_inputs, [])
            finally:
                for h in hooks:
                    h.remove()
            self._dense_x = xs
        return self._dense_x

    def drop_dense_weights(self) -> None:
        """Free the dense copy's weights once its stream is cached (`dense_projection_inputs`): for a caller that
        needs only that stream and `run(dense=True)`. The copy stays a module tree on the meta device, so `twin`
        still finds its modules; running it is refused. An 8B model's block: 0.44 GB (bf16) less at the peak."""
        if self.dense is None or self._dense_out is None:
            raise ValueError("the dense stream is not cached yet: call dense_projection_inputs() first")
        self.dense.to("meta")

    def batches(self, inputs: list[torch.Tensor] | None = None,
                shortcuts: list[Shortcut] | None = None) -> Iterator[tuple[int, torch.Tensor, dict[str, Any]]]:
        """(index, input, kwargs) of every calibration batch (default: this block's inputs), inside the compute
        context with `shortcuts` (default: this block's) installed and pointed at the current batch."""
        inputs = self.inputs if inputs is None else inputs
        shortcuts = self.shortcuts if shortcuts is None else shortcuts
        with self.compute(), shortcuts_installed(shortcuts):
            for i, (x, kw) in enumerate(zip(inputs, self.kwargs)):
                for s in shortcuts:
                    s.batch = i
                yield i, x, kw

    def _forward(self, module: nn.Module, inputs: list[torch.Tensor], shortcuts: list[Shortcut]) -> list[torch.Tensor]:
        outs = self.store()
        for _, x, kw in self.batches(inputs, shortcuts):
            y = module(x, **kw)
            y = y[0] if isinstance(y, tuple) else y
            outs.append(y if y.dtype == x.dtype else y.to(x.dtype))
        return outs

    @torch.no_grad()
    def run(self, dense: bool = False) -> list[torch.Tensor]:
        """Run the block (as it is now) on every calibration batch; `dense`: its dense copy on the dense inputs."""
        if dense:
            if self._dense_out is not None:
                return self._dense_out
            if any(p.is_meta for p in self.dense.parameters()):
                raise RuntimeError("the dense copy's weights were dropped (drop_dense_weights) before its outputs were cached")
            return self._forward(self.dense, self.dense_inputs, [])
        return self._forward(self.block.module, self.inputs, self.shortcuts)

    @torch.no_grad()
    def collect(self, projs: dict[str, Proj], hessian: bool = False) -> dict[str, LayerStats]:
        """Run the block with hooks on `projs`; return each one's input statistics (summed over processes)."""
        stats = {name: LayerStats() for name in projs}
        hooks = []

        def make_hook(name: str):
            def hook(_mod: nn.Module, args: tuple, _out: Any) -> None:
                X = args[0].reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
                st = stats[name]
                sq = (X * X).sum(0).double()  # summed over batches (and processes) in float64: any order, same bits
                st.sq = sq if st.sq is None else st.sq + sq
                if hessian:
                    st.H = self.gram(X) if st.H is None else self.gram(X, out=st.H)  # (in, in)
                st.n += X.shape[0]

            return hook

        try:
            for name, p in projs.items():
                hooks.append(p.module.register_forward_hook(make_hook(name)))
            self.run()
        finally:
            for h in hooks:
                h.remove()
        for st in stats.values():
            parallel.all_reduce_(st.sq, st.H)
            st.sq, st.n = st.sq.float(), parallel.reduce_sum(st.n)
        return stats


class BlockKwargs(dict):
    """The keyword arguments block 0 receives for one batch; `kinds` holds those of the first block of every other
    kind (Gemma3's global layers get another mask and RoPE than its sliding-window ones): use `for_block`."""

    kinds: dict[str | None, dict[str, Any]]


def for_block(kw: dict[str, Any], block: Block) -> dict[str, Any]:
    """The keyword arguments of `block` for a batch whose block-0 arguments are `kw` (see capture_inputs)."""
    kinds = getattr(kw, "kinds", None)
    return kinds.get(block.kind, kw) if kinds else kw


def is_images(batch: torch.Tensor) -> bool:
    """True for pixel values (n, 3, H, W) (floating point), False for token windows (n, T) (integers)."""
    return batch.is_floating_point() and batch.dim() == 4


def model_inputs(anatomy: Anatomy, batch: torch.Tensor) -> dict[str, Any]:
    """The forward's keyword arguments for a calibration batch: token windows (n, T) or images (n, 3, H, W)."""
    if is_images(batch):
        if anatomy.family not in ("vit", "dinov2"):
            raise ValueError(f"calibration images (n, 3, H, W) given to a {anatomy.family} model; it reads token "
                             "windows (n, length)")
        return {"pixel_values": batch}
    if batch.is_floating_point() or batch.dim() != 2:
        raise ValueError(f"calibration must be token windows (n, length) of integers or images (n, 3, H, W), got "
                         f"{batch.dtype} of shape {tuple(batch.shape)}")
    if anatomy.family in ("vit", "dinov2"):
        raise ValueError(f"{anatomy.family} reads images: calibrate it with pixel values (n, 3, H, W), e.g. "
                         "trimformer.data.images.retrieval_views(...)[0]")
    return {"input_ids": batch, "use_cache": False} if anatomy.causal else {"input_ids": batch}


def tokens_per_input(anatomy: Anatomy, windows: torch.Tensor) -> int:
    """Sequence length block 0 sees for one calibration input (patches + [CLS] for images)."""
    inputs, _ = capture_inputs(anatomy, windows[:1])
    return int(inputs[0].shape[1])


@torch.no_grad()
def capture_inputs(anatomy: Anatomy, windows: torch.Tensor, batch_size: int = 1, store: Any = list) -> tuple[list, list]:
    """Inputs (hidden states, keyword arguments) of block 0 for each calibration batch (token windows, or pixel
    values for a ViT: `model_inputs`); `store()` makes the list
    the hidden states go to (models.offload.activations for one that spills to disk).

    When blocks differ in kind, the forward runs on to the first block of each kind to record its arguments too
    (`BlockKwargs.kinds`; `for_block` picks them)."""
    model = anatomy.model
    first_of: dict[str | None, int] = {}
    for b in anatomy.blocks:
        first_of.setdefault(b.kind, b.index)
    last = max(first_of.values())
    inputs = store()
    kwargs: list[dict[str, Any]] = []

    def pre_hook(i: int, kind: str | None, _mod: nn.Module, args: tuple, kw: dict) -> None:
        x = args[0] if args else kw["hidden_states"]
        kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value", "hidden_states", "cache")}
        kw["use_cache"] = False
        if i == 0:
            inputs.append(x)
            kwargs.append(BlockKwargs(kw))
            kwargs[-1].kinds = {}
        kwargs[-1].kinds[kind] = kw
        if i == last:
            raise _Stop

    device = device_of(model)
    # prepend: stop before anything else runs for the block (a streamed block 0 is not even read)
    hs = [anatomy.blocks[i].module.register_forward_pre_hook(functools.partial(pre_hook, i, kind), with_kwargs=True,
                                                             prepend=True)
          for kind, i in first_of.items()]
    try:
        with held(model):  # a streamed model reads its embeddings once for all batches
            for i in range(0, windows.shape[0], batch_size):
                batch = windows[i : i + batch_size].to(device)
                try:
                    model(**model_inputs(anatomy, batch))
                except _Stop:
                    pass
    finally:
        for h in hs:
            h.remove()
    return inputs, kwargs


def blocks(
    anatomy: Anatomy,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "calibrating",
    precision: str = "fp32",
    dense_targets: bool = False,
    save: bool = True,
) -> Iterator[BlockCalib]:
    """Yield each block with its calibration inputs; after the caller prunes it, its outputs feed the next.

    precision: 'fp32' runs the forwards in the model's dtype; 'bf16' / 'auto' (see resolve_precision) run
    them under bf16 autocast, several times faster where bf16 is native. X^T X is always fp32 (BlockCalib.gram).
    dense_targets: also carry the dense model's stream: each BlockCalib gets an unpruned copy of its block
    (`dense`) and the inputs the dense model gives it (`dense_inputs`), so a method can fit the dense outputs.
    save: on a streamed model, write each block once it is done (False for passes that only measure).
    With several processes, each runs its share of `windows` (parallel.share).
    """
    total = windows.shape[0]
    windows = windows[parallel.share(total)]
    store = functools.partial(activations, anatomy.model)
    inputs, kwargs = capture_inputs(anatomy, windows, batch_size, store)
    tokens = total * inputs[0].shape[-2] if len(inputs) else None  # every input is as long as the first
    compute_dtype = resolve_precision(precision, device_of(anatomy.model))
    if compute_dtype is not None and dtype_of(anatomy.model) == compute_dtype:
        compute_dtype = None  # the model already runs in that dtype
    dense_inputs = inputs if dense_targets else None
    for block in bar(anatomy.blocks, desc=desc, unit="block", disable=not progress):
        with onload(block.module, save=save):  # (streamed: read now, written and freed at the end)
            dense = copy.deepcopy(block.module) if dense_targets else None
            bc = BlockCalib(block, inputs, kwargs, compute_dtype, dense, dense_inputs, store=store, tokens=tokens)
            yield bc
            inputs = bc.run()  # outputs of the pruned block
            if dense_targets:
                dense_inputs = bc.run(dense=True)
