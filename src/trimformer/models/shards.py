"""safetensors files read one tensor at a time and written one tensor at a time.

A streamed run (models/offload.py) never holds a checkpoint in memory: a tensor is read with one positioned
read into its own buffer (no memory map, so nothing of the file stays resident once the tensor is freed), and a
shard is written by laying out its header first and then each tensor at its offset. The format is the one the
`safetensors` library reads and writes: an 8-byte little-endian header length, a JSON header (padded with
spaces to a multiple of 8) of {name: {dtype, shape, data_offsets}} and `__metadata__`, then the raw data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class ShardError(ValueError):
    """A safetensors file that cannot be read as one (truncated, bad header, unknown dtype)."""


@dataclass(frozen=True)
class Entry:
    """Where one tensor lies: file, dtype, shape and its byte range in the file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str | os.PathLike) -> dict[str, Entry]:
    """The tensors of one safetensors file (nothing but the header is read)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ShardError(f"{str(path)!r} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 2**20:
            raise ShardError(f"{str(path)!r}: header length {n} does not fit the file; the file is damaged")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ShardError(f"{str(path)!r}: unreadable safetensors header; the file is damaged") from None
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        if h.get("dtype") not in DTYPES:
            raise ShardError(f"{str(path)!r}: tensor {name!r} has dtype {h.get('dtype')!r}, which streaming does not read")
        b, e = h["data_offsets"]
        dtype, shape = DTYPES[h["dtype"]], tuple(h["shape"])
        if e - b != math.prod(shape) * dtype.itemsize or 8 + n + e > size:
            raise ShardError(f"{str(path)!r}: tensor {name!r} lies outside the file or has the wrong size; the file "
                             "is damaged (truncated?)")
        out[name] = Entry(path, dtype, shape, 8 + n + b, e - b)
    return out


def read(entry: Entry) -> torch.Tensor:
    """One tensor from disk into a fresh CPU buffer of its own (one positioned read)."""
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    if entry.nbytes:
        with open(entry.file, "rb", buffering=0) as f:
            f.seek(entry.start)
            view, done = memoryview(buf.numpy()), 0
            while done < entry.nbytes:  # readinto may return short counts on large reads
                got = f.readinto(view[done:])
                if not got:
                    raise ShardError(f"{str(entry.file)!r} ended early; the file is damaged (truncated?)")
                done += got
    return buf.view(entry.dtype).reshape(entry.shape)


def folder_index(folder: str | os.PathLike) -> dict[str, Entry]:
    """Every tensor of a checkpoint folder: one model.safetensors, or the shards its index names."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        try:
            files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ShardError(f"{str(folder / INDEX)!r} is not a valid safetensors index; the checkpoint is damaged") from None
    elif (folder / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise ShardError(f"{str(folder)!r} has no safetensors weights ({SINGLE} or {INDEX}); streaming reads "
                         "safetensors checkpoints only: re-save the model with `trimformer export MODEL --format dense`")
    out: dict[str, Entry] = {}
    for f in files:
        if not (folder / f).is_file():
            raise ShardError(f"{str(folder)!r}: shard {f!r} named by the index is missing")
        out.update(read_header(folder / f))
    return out


class ShardWriter:
    """Write one safetensors file tensor by tensor: the layout (names, dtypes, shapes) is fixed up front.

        w = ShardWriter(path, {"a": (torch.bfloat16, (4, 8))})
        w.put("a", tensor); w.close()          # close() checks every planned tensor was written
    """

    def __init__(self, path: str | os.PathLike, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        self.path = Path(path)
        header: dict = {"__metadata__": {"format": "pt"}}
        self.offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for name, (dtype, shape) in layout.items():
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
            self.offsets[name] = (pos, n)
            pos += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.base = 8 + len(text)
        self.layout = layout
        self.todo = set(layout)
        self.f = open(self.path, "wb")
        self.f.write(struct.pack("<Q", len(text)) + text)
        self.f.truncate(self.base + pos)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self.layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name}: planned {dtype} {tuple(shape)}, got {tensor.dtype} {tuple(tensor.shape)}")
        start, n = self.offsets[name]
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        self.f.seek(self.base + start)
        if n:
            self.f.write(memoryview(t.view(torch.uint8).numpy()))
        self.todo.discard(name)

    def close(self) -> None:
        self.f.close()
        if self.todo:
            raise RuntimeError(f"{self.path.name}: {len(self.todo)} planned tensor(s) never written, e.g. {min(self.todo)}")

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:
            self.f.close()


def write(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """A whole safetensors file from tensors in memory."""
    with ShardWriter(path, {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}) as w:
        for k, t in tensors.items():
            w.put(k, t)
