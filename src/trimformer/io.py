"""Writing outputs safely: atomic folders and files, checked before any work starts.

Every output of trimformer (a checkpoint, a report, a cache) is written into a temporary sibling and renamed
into place only when complete, so a failed or interrupted run leaves nothing half-written. The temporary
names say whose they are (`.NAME.trimformer-tmp-PID-...`): a run killed outright (SIGKILL) leaves one behind,
and the next run into the same place removes it when its process is gone. Permissions follow the umask, as
for any normal file write (tempfile alone would make them private).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["OutputError", "OutputExistsError", "atomic_dir", "atomic_file", "check_output", "clean_stale",
           "write_files"]


class OutputError(ValueError):
    """An output location that cannot be used (inside the input, not writable, no space)."""


class OutputExistsError(FileExistsError):
    pass


_TAG = ".trimformer-tmp-"
_STALE = re.compile(r"^\.(?P<name>.+)" + re.escape(_TAG) + r"(?P<pid>\d+)-")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _follow_umask(root: Path) -> None:
    """Give `root` and everything below it the modes a plain write would have (0777 / 0666 minus the umask)."""
    mask = _umask()
    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(out: str | os.PathLike, *, say: bool = True) -> list[Path]:
    """Remove temporary siblings of `out` that a killed run of ours left behind (their process is gone)."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        m = _STALE.match(p.name)
        if m is None or m["name"] != out.name or _alive(int(m["pid"])):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
        if say:
            print(f"trimformer: removed {p}, left behind by an interrupted run", file=sys.stderr)
    return removed


def _temp_name(out: Path) -> str:
    return f".{out.name}{_TAG}{os.getpid()}-"


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on any error it vanishes."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder {str(out)!r} exists; choose another or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_name(out), dir=out.parent))
    try:
        yield tmp
        _follow_umask(tmp)
        if out.exists():
            old = out.with_name(f"{_temp_name(out)}old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_files(folder: str | os.PathLike, files: dict[str, Any] | None) -> None:
    """Files beside a checkpoint (inside an atomic_dir): name -> str (text) or anything JSON-able (indented JSON)."""
    for name, content in (files or {}).items():
        (Path(folder) / name).write_text(content if isinstance(content, str) else
                                         json.dumps(content, indent=2, default=str))


def atomic_file(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` to `path` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_name(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        _follow_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_output(out: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
                 need_bytes: int = 0) -> Path:
    """Refuse an output location before any work: one that is, holds or lies inside an input (symlinks resolved),
    one that exists (without `overwrite`), one whose nearest existing parent is not a writable folder, or one
    whose disk has less free space than `need_bytes` (an estimate of what will be written)."""
    out = Path(out).expanduser()
    real = out.resolve()
    for src in inputs:
        p = Path(src).expanduser()
        if not p.exists():
            continue
        src_real = p.resolve()
        if _inside(real, src_real) or _inside(src_real, real):
            raise OutputError(f"--out {str(out)!r} is, contains or lies inside the input {str(src)!r}; the input is "
                              "never modified: choose an output folder outside it")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output {str(out)!r} exists; choose another or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {str(out)!r} exists and is not a folder; choose a folder path")
    parent = real.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot create {str(out)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {str(parent)!r} (permission denied); choose another --out")
    if need_bytes:
        free = shutil.disk_usage(parent).free
        if free < need_bytes:
            raise OutputError(f"not enough disk space for {str(out)!r}: about {need_bytes / 1e9:.2f} GB needed, "
                              f"{free / 1e9:.2f} GB free on {str(parent)!r}")
    return out
