"""The architecture contract beyond import-linter's layers: no module reaches into another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "trimformer"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(mod: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module an ImportFrom names (relative levels resolved against `mod`)."""
    if not node.level:
        return node.module or ""
    base = mod.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def private_reaches(path: Path) -> list[str]:
    """`from other import _x`, and `other._x` where `other` names another trimformer module imported here."""
    mod, tree = module_name(path), ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = resolve(mod, node, is_package)
            if not source.startswith("trimformer"):
                continue
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__") and source != mod:
                    found.append(f"{path.name}:{node.lineno} imports {source}.{a.name}")
                modules.add(a.asname or a.name)  # `from .. import offload`: offload may be a module
        elif isinstance(node, ast.Import):
            modules.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("trimformer"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path.name}:{node.lineno} reads {node.value.id}.{node.attr}")
    return found


def test_no_module_reads_another_modules_private_names():
    found = [f for p in sorted(SRC.rglob("*.py")) for f in private_reaches(p)]
    assert not found, "private names used across modules (make them public or move the code):\n" + "\n".join(found)


def test_the_check_sees_a_private_reach(tmp_path, monkeypatch):
    pkg = tmp_path / "trimformer" / "export"
    pkg.mkdir(parents=True)
    bad = pkg / "bad.py"
    bad.write_text("from ..models import offload\nfrom ..models.offload import _hidden\noffload._params(1)\n")
    monkeypatch.setitem(globals(), "SRC", tmp_path / "trimformer")
    assert private_reaches(bad) == ["bad.py:2 imports trimformer.models.offload._hidden", "bad.py:3 reads offload._params"]
