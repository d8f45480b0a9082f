"""All method registries in one place, and recipes: ordered lists of steps."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import coerce_fields, setting_names, settings
from .recover.step import RECOVER
from .registry import Registry
from .structure import STRUCTURE
from .weights import WEIGHTS

# Offline families (their methods are OfflineSteps: `apply_(anatomy, StepContext)`); explicit, in order.
REGISTRIES: list[Registry] = [WEIGHTS, STRUCTURE, RECOVER]


def find(name: str) -> type:
    for reg in REGISTRIES:
        if name in reg:
            return reg.get(name)
    names = sorted(n for reg in REGISTRIES for n in reg.names())
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise KeyError(f"unknown method {name!r}.{hint} Available: {', '.join(names)}")


def build(name: str, settings: dict[str, Any] | None = None):
    cls = find(name)
    return cls(**coerce_fields(cls, dict(settings or {})))


@dataclass
class Step:
    method: str
    settings: dict[str, Any] = field(default_factory=dict)

    def build(self):
        return build(self.method, self.settings)


@dataclass
class Recipe:
    """An ordered list of steps. Precedence: method defaults < recipe < CLI `--set field=value`."""

    steps: list[Step]

    @classmethod
    def one(cls, method: str, **settings: Any) -> Recipe:
        return cls([Step(method, settings)])

    @classmethod
    def from_obj(cls, obj: Any) -> Recipe:
        rows = obj.get("steps") if isinstance(obj, dict) else obj
        if not isinstance(rows, list) or not rows:
            raise ValueError("a recipe is a non-empty list of steps, e.g. [{method: wanda, sparsity: 0.5}]")
        steps = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or "method" not in row:
                raise ValueError(f"recipe step {i}: expected a mapping with a 'method' key, got {row!r}")
            row = dict(row)
            steps.append(Step(str(row.pop("method")), row))
        recipe = cls(steps)
        recipe.build()  # validate names and values now, not half-way through a run
        return recipe

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"recipe {str(p)!r} does not exist")
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            obj = yaml.safe_load(text)
        elif p.suffix == ".toml":
            import tomllib

            obj = tomllib.loads(text)
        elif p.suffix == ".json":
            obj = json.loads(text)
        else:
            raise ValueError(f"recipe {str(p)!r}: use a .yaml, .toml or .json file")
        return cls.from_obj(obj)

    def override(self, settings: dict[str, Any]) -> Recipe:
        """Apply `--set` values to every step that has such a field; unknown everywhere is an error."""
        used = set()
        steps = []
        for s in self.steps:
            names = setting_names(find(s.method))  # (fields, their flat aliases, 'group.field')
            mine = {k: v for k, v in settings.items() if k in names}
            used |= set(mine)
            steps.append(Step(s.method, {**s.settings, **mine}))
        unknown = set(settings) - used
        if unknown:
            raise ValueError(f"--set {', '.join(sorted(unknown))}: no step of the recipe has such a setting")
        return Recipe(steps)

    def build(self) -> list:
        return [s.build() for s in self.steps]

    def to_list(self) -> list[dict[str, Any]]:
        out = []
        for m in self.build():
            out.append({"method": type(m).name, **settings(m)})
        return out
