"""How much memory and disk a pruning run needs, before it starts: in memory, or streamed from disk.

    fp = footprint(skeleton_model, dtype=torch.bfloat16, windows=64, length=512, hessian=True)
    fp.in_memory, fp.streamed, fp.disk          # bytes
    print(fp.describe(streaming=True))          # "needs ~3.1 GB in memory, 16.1 GB on disk (streamed ...)"

The figures are estimates from the shapes alone (benchmarks/streaming.py prints them next to the measured peak):
the resident part of a streamed run is the largest block (twice with a dense stream), the method's working set
for its largest projection, the activations kept between blocks (past the spill budget they go to disk), and
the runtime itself (torch and transformers imported).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

RUNTIME = 700 * 2**20  # resident size of a process with torch + transformers imported (measured: 0.6-0.7 GB)


@dataclass
class Footprint:
    model: int  # bytes of the weights in the run's dtype
    largest_block: int
    largest_other: int  # the largest part outside the blocks (embeddings, head)
    working_set: int  # the method's statistics and temporaries for its largest projection group
    activations: int  # calibration activations kept between blocks (all streams, all windows)
    dense_stream: bool  # a copy of each block runs beside it (asymmetric calibration)
    evaluation: bool  # the in-memory run also loads the dense model to compare with
    available: int  # memory available on the compute device now
    spill_budget: int  # activations kept in memory by a streamed run; the rest spill

    @property
    def in_memory(self) -> int:
        return RUNTIME + self.model * (2 if self.evaluation else 1) + self.working_set + self.activations

    @property
    def streamed(self) -> int:
        blocks = self.largest_block * (2 if self.dense_stream else 1) + self.working_set
        return RUNTIME + max(blocks, self.largest_other) + min(self.activations, self.spill_budget)

    @property
    def disk(self) -> int:
        """Written by a streamed run: the checkpoint, and the activations past the spill budget."""
        return self.model + max(self.activations - self.spill_budget, 0)

    def fits(self) -> bool:
        """The in-memory run fits comfortably: within 80 % of the memory available now."""
        return self.in_memory <= 0.8 * self.available

    def describe(self, streaming: bool) -> str:
        gb = 1e9
        if streaming:
            return (f"streaming from disk: needs ~{self.streamed / gb:.1f} GB in memory, {self.disk / gb:.1f} GB on "
                    f"disk (in memory it would need ~{self.in_memory / gb:.1f} GB; {self.available / gb:.1f} GB "
                    "available)")
        return (f"in memory: needs ~{self.in_memory / gb:.1f} GB ({self.available / gb:.1f} GB available), "
                f"{self.model / gb:.1f} GB on disk for the checkpoint")


def available_memory(device: torch.device) -> int:
    """Bytes free for a new allocation: the GPU's free memory, or the system's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:  # pragma: no cover
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def footprint(model: nn.Module, *, dtype: torch.dtype, device: torch.device | str = "cpu", windows: int = 64,
              length: int = 512, batch_size: int = 1, hessian: bool = False, dense_stream: bool = False,
              evaluation: bool = True, spill_budget: int | None = None) -> Footprint:
    """The footprint of pruning `model` (any model; a meta skeleton is enough) in `dtype` on `device`.

    hessian: the method keeps X^T X per projection input (SparseGPT); dense_stream: it also carries the dense
    model's stream and cross products (SparseGPT's asymmetric calibration)."""
    from . import anatomy_of

    a = anatomy_of(model)
    size = torch.tensor([], dtype=dtype).element_size()

    def nbytes(params) -> int:
        seen: dict[int, int] = {}
        for p in params:
            seen[id(p)] = p.numel() * (size if p.is_floating_point() else p.element_size())
        return sum(seen.values())

    blocks = {id(p) for b in a.blocks for p in b.module.parameters()}
    block = max((nbytes(b.module.parameters()) for b in a.blocks), default=0)
    others = [m for m in model.modules() if any(id(p) not in blocks for p in m.parameters(recurse=False))]
    other = max((nbytes(m.parameters(recurse=False)) for m in others), default=0)
    work = 0
    for b in a.blocks:
        projs = b.projections()
        if not hessian:  # per layer: W in fp32, its score, the sort (values + int64 indices), the mask
            work = max([work, *(p.weight.numel() * (4 + 4 + 4 + 8 + 1) for p in projs.values())])
            continue
        groups: dict[str, tuple[int, int]] = {}  # projections solved together (one input) -> (input width, rows)
        for short, p in projs.items():
            key = short if short in ("attn.o", "mlp.down") else short.split(".")[0]
            d, rows = groups.get(key, (p.in_features, 0))
            groups[key] = (d, rows + p.out_features)
        for d, rows in groups.values():  # fp32: H and C, or H and its factor; W stacked and W (C - H) or the
            work = max(work, (2 * d * d + 2 * rows * d) * 4)  # solve's copy (weights.sparsegpt.SparseGPT.solve)
    inner = max((b.mlp.intermediate_size for b in a.blocks if b.mlp is not None), default=a.hidden_size)
    act = max(size, 4) if dtype == torch.float32 else size
    per_token = a.hidden_size * act * 2 + inner * act  # a block's inputs and outputs, the MLP's inner input
    if dense_stream:  # the dense stream, and every projection's dense input
        per_token += a.hidden_size * act * 2 + (4 * a.hidden_size + 2 * inner) * act
    device = torch.device(device)
    budget = spill_budget if spill_budget is not None else default_spill_budget(device)
    return Footprint(nbytes(model.parameters()), block, other, work, windows * length * per_token, dense_stream,
                     evaluation, available_memory(device), budget)


def default_spill_budget(device: torch.device | str = "cpu") -> int:
    """Activations a streamed run keeps in memory before spilling to disk: a quarter of what is available, at
    most 4 GB."""
    return min(available_memory(torch.device(device)) // 4, 4 * 2**30)
