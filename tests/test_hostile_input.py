"""Hostile input, as a careless or malicious user would give it: every case gets one clear line and exit 2,
nothing runs unasked, nothing is half-written, and the input is never touched. New commands join this suite.

The rule (README "Errors"): a user error exits 2 with `trimformer: error: <problem and fix>`; only a bug shows
a traceback (exit 1, asking for a report).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import tiny, tiny_tokenizer

import trimformer
from trimformer.cli import main
from trimformer.data import DataWarning, read_text
from trimformer.io import OutputError, atomic_dir
from trimformer.models.load import ModelLoadError, RemoteCodeError

FAST = ["--calib-windows", "2", "--calib-length", "32", "--no-eval", "-q"]


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def run(capsys, *argv) -> tuple[int, str]:
    try:
        code = main(["-q", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    return code, err


def user_error(capsys, *argv, match: str) -> None:
    code, err = run(capsys, *argv)
    assert code == 2, err
    assert err.startswith("trimformer: error: ") and err.count("\n") == 1, err  # one line
    assert match in err, err
    assert "Traceback" not in err


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "model"
    tiny("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


# -- a model folder cannot run its own code ---------------------------------------------------------------
EVIL = '''import pathlib
pathlib.Path({marker!r}).write_text("code from the folder ran")
from transformers import LlamaForCausalLM


class TrimmedLlamaForCausalLM(LlamaForCausalLM):
    pass
'''


def plant(folder: Path, filename: str = "trimformer_modeling.py", cls: str = "TrimmedLlamaForCausalLM") -> None:
    (folder / filename).write_text(EVIL.format(marker=str(folder / "RAN")))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": f"{filename[:-3]}.{cls}"}
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("filename", ["trimformer_modeling.py", "modeling_other.py"])
def test_folder_code_never_runs_unasked(folder, capsys, filename):
    plant(folder, filename)
    with pytest.raises(RemoteCodeError, match=f"{filename}.*--trust-remote-code"):
        trimformer.load(folder)
    user_error(capsys, "info", str(folder), match="--trust-remote-code")
    assert not (folder / "RAN").exists()
    trimformer.load(folder, trust_remote_code=True)  # the user opted in
    assert (folder / "RAN").exists()


def test_cli_flag_opts_in(folder, capsys):
    plant(folder)
    assert main(["-q", "info", str(folder), "--trust-remote-code"]) == 0
    assert (folder / "RAN").exists()


def test_our_own_modeling_file_loads_without_opting_in(tmp_path, ids):
    from trimformer.structure import surgery

    model = tiny("llama")
    surgery.prune_neurons(trimformer.anatomy_of(model).blocks[0], torch.arange(64))  # heterogeneous widths
    trimformer.export.save(model, tmp_path / "m")
    again = trimformer.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    src = tmp_path / "m" / "trimformer_modeling.py"
    src.write_text(src.read_text() + "\n# one changed byte makes it someone else's code\n")
    with pytest.raises(RemoteCodeError):
        trimformer.load(tmp_path / "m")


# -- the input is never overwritten --------------------------------------------------------------------
def test_output_that_is_or_holds_or_lies_in_the_input_is_refused(folder, tmp_path, capsys):
    before = digest(folder)
    link = tmp_path / "link"
    link.symlink_to(folder)
    for out in (folder, folder / "sub", tmp_path, link):
        user_error(capsys, "prune", "--model", str(folder), "--method", "magnitude", "--out", str(out), "--overwrite",
                   *FAST, match="the input is never modified")
    assert digest(folder) == before


# -- a partly random model is never saved ----------------------------------------------------------------
def test_config_claiming_more_layers_than_the_weights_is_refused(folder, tmp_path, capsys):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="missing.*model.layers.2"):
        trimformer.load(folder)
    out = tmp_path / "out"
    user_error(capsys, "prune", "--model", str(folder), "--method", "magnitude", "--out", str(out), *FAST,
               match="does not match its config")
    assert not out.exists()


def test_config_width_disagreeing_with_the_weights_is_refused(folder, capsys):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    user_error(capsys, "info", str(folder), match="could not load")


@pytest.mark.parametrize("damage", ["truncate", "header"])
@pytest.mark.parametrize("command", ["info", "analyze", "export", "prune"])
def test_damaged_safetensors_is_one_line(folder, tmp_path, capsys, damage, command):
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 8 + data[8:])
    argv = {"info": ["info", str(folder)], "analyze": ["analyze", str(folder)],
            "export": ["export", str(folder), "--out", str(tmp_path / "e")],
            "prune": ["prune", "--model", str(folder), "--method", "magnitude", "--out", str(tmp_path / "p"), *FAST]}
    user_error(capsys, *argv[command], match="could not load")


def test_truncated_gguf_is_one_line(tmp_path, capsys):
    import gguf

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path.write_bytes(path.read_bytes()[:-40])
    code, err = run(capsys, "info", str(path))
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err


# -- checked before any work -----------------------------------------------------------------------------
def test_output_under_a_file_is_refused_before_loading(folder, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    user_error(capsys, "prune", "--model", "no-such-model-loads-before-this", "--method", "magnitude",
               "--out", str(tmp_path / "afile" / "out"), *FAST, match="is a file, not a folder")


def test_not_enough_disk_is_refused_before_work(folder, tmp_path, monkeypatch, capsys):
    import shutil

    from trimformer.io import check_output
    from trimformer.models.load import estimate_bytes

    with pytest.raises(OutputError, match="not enough disk space"):
        check_output(tmp_path / "out", need_bytes=1 << 62)
    assert estimate_bytes(folder) == (folder / "model.safetensors").stat().st_size
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))  # a full disk
    user_error(capsys, "prune", "--model", str(folder), "--method", "magnitude", "--out", str(tmp_path / "o"),
               *FAST, match="not enough disk space")


def test_stale_temporary_folder_of_a_killed_run_is_cleaned(tmp_path, capsys):
    stale = tmp_path / ".out.trimformer-tmp-999999999-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    other = tmp_path / ".out.someone-elses"
    other.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("done")
    assert not stale.exists() and other.exists() and (tmp_path / "out" / "x").is_file()
    assert "left behind by an interrupted run" in capsys.readouterr().err


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "weights.bin").write_bytes(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "weights.bin").stat().st_mode) == 0o644


@pytest.mark.parametrize("argv,match", [
    (["--method", "magnitude", "--pattern", "2:4", "--sparsity", "0.7"], "fixes the sparsity at 0.5"),
    (["--method", "magnitude", "--sparsity", "0.7", "--set", "sparsity=0.6"], "disagree"),
    (["--method", "wanda", "--calib-length", "4096"], "longer than the model's 256 positions"),
    (["--method", "wanda", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--method", "wanda", "--batch-size", "-1"], "--batch-size must be a positive integer"),
    (["--method", "depth", "--remove", "1.5"], "remove='1.5': expected an integer"),
    (["--method", "wanda", "--set", "sparsty=0.5"], "Did you mean 'sparsity'"),
    (["--method", "wanda", "--set", "sparsity=abc"], "sparsity='abc': expected a number"),
    (["--method", "width", "--set", "target=flops=abc"], "target"),
    (["--method", "wanda", "--overwirte"], "did you mean --overwrite?"),
])
def test_bad_settings_are_one_line_and_write_nothing(folder, tmp_path, capsys, argv, match):
    out = tmp_path / "never"
    user_error(capsys, "prune", "--model", str(folder), "--out", str(out), *[a for a in FAST if a != "-q"][:4],
               "--no-eval", *argv, match=match)
    assert not out.exists()


def test_misspelled_flag_of_another_command_gets_a_suggestion(capsys):
    code, err = run(capsys, "info", "x", "--jsn")
    assert code == 2 and "did you mean --json?" in err


# -- recipes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,text,match", [
    ("r.yaml", "steps:\n  - method: wanda\n    sparsity: [0.5\n", "r.yaml:4: not valid YAML"),
    ("r.json", '{"steps": [{"method": "wanda",}]}', "r.json:1: not valid JSON"),
    ("r.toml", "[[steps]]\nmethod = wanda\n", "r.toml: not valid TOML"),
])
def test_malformed_recipe_names_file_and_line(folder, tmp_path, capsys, name, text, match):
    (tmp_path / name).write_text(text)
    user_error(capsys, "prune", "--model", str(folder), "--recipe", str(tmp_path / name), "--out",
               str(tmp_path / "o"), *FAST, match=match)


# -- data ------------------------------------------------------------------------------------------------
def test_jsonl_rows_that_are_not_objects(folder, tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n["a list"]\n')
    user_error(capsys, "prune", "--model", str(folder), "--method", "wanda", "--calib", str(tmp_path / "d.jsonl"),
               "--out", str(tmp_path / "o"), *FAST, match="d.jsonl:2: each line must be a JSON object")


def test_jsonl_wrong_field_names_the_prune_flag(folder, tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"body": "text here"}\n')
    user_error(capsys, "prune", "--model", str(folder), "--method", "wanda", "--calib", str(tmp_path / "d.jsonl"),
               "--out", str(tmp_path / "o"), *FAST, match="no field 'text' (fields: body); choose one with --calib-field")


def test_binary_calibration_text_warns(tmp_path):
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 64)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        read_text(tmp_path / "blob.txt")
    assert any(issubclass(w.category, DataWarning) and "not text" in str(w.message) for w in seen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (tmp_path / "fine.txt").write_text("plain text, as calibration text should be.\n" * 50)
        read_text(tmp_path / "fine.txt")


# -- eval against an incomparable reference ---------------------------------------------------------------
def test_eval_against_another_kind_of_model_is_refused(folder, tmp_path, capsys):
    enc = tmp_path / "encoder"
    tiny("bert").save_pretrained(enc)
    tiny_tokenizer().save_pretrained(enc)
    for model, ref in ((folder, enc), (enc, folder)):
        user_error(capsys, "eval", "--model", str(model), "--reference", str(ref), "--no-speed",
                   "--eval-windows", "1", "--eval-length", "16", match="give the dense model this one was pruned from")


def test_eval_against_another_vocabulary_is_refused(folder, tmp_path, capsys):
    other = tmp_path / "other"
    T.LlamaForCausalLM(T.LlamaConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=128, vocab_size=300)).save_pretrained(other)
    user_error(capsys, "eval", "--model", str(folder), "--reference", str(other), "--no-speed",
               "--eval-windows", "1", "--eval-length", "16", match="vocabulary (259 tokens) differs")


# -- output messages ---------------------------------------------------------------------------------------
def test_no_eval_does_not_claim_a_report(folder, tmp_path, capsys):
    assert main(["-q", "prune", "--model", str(folder), "--method", "magnitude", "--out", str(tmp_path / "o"),
                 *FAST]) == 0
    out = capsys.readouterr().out
    assert "report.json" not in out and "no evaluation" in out
    assert not (tmp_path / "o" / "report.json").exists()


def test_a_bug_shows_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    from trimformer.commands import core

    def broken(args):
        raise RuntimeError("an internal invariant failed")

    monkeypatch.setattr(core, "cmd_info", broken)
    code = main(["info", "x"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "please report it" in err
