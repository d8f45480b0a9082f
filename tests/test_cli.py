"""The CLI end to end on a tiny local checkpoint: prune -> eval -> reload; bad input writes nothing."""

from __future__ import annotations

import json

import pytest
import torch

import trimformer
from trimformer.cli import main

FAST = ["--calib-windows", "2", "--calib-length", "32", "--eval-windows", "2", "--kl-windows", "1",
        "--eval-length", "32", "--no-speed", "-q"]


def run(*argv):
    return main(["-q", *argv] if "-q" not in argv else list(argv))


def test_prune_writes_checkpoint_and_report(saved_llama, tmp_path, capsys):
    out = tmp_path / "pruned"
    before = (saved_llama / "model.safetensors").read_bytes()
    assert main(["prune", "--model", str(saved_llama), "--method", "wanda", "--sparsity", "0.5",
                 "--out", str(out), *FAST[:-1]]) == 0
    assert (saved_llama / "model.safetensors").read_bytes() == before  # input never touched
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == "trimformer.report/1"
    assert report["cost"]["sparsity_prunable"] == pytest.approx(0.5, abs=1e-3)
    assert report["quality"]["kl"] > 0 and 0 < report["quality"]["top1_agree"] <= 1
    meta = json.loads((out / "trimformer.json").read_text())
    assert meta["recipe"][0]["method"] == "wanda" and meta["recipe"][0]["sparsity"] == 0.5
    assert "| perplexity" in (out / "report.md").read_text()
    model = trimformer.load(out)
    up = model.model.layers[0].mlp.up_proj.weight
    assert (up == 0).float().mean().item() == 0.5
    assert main(["eval", "--model", str(out), "--reference", str(saved_llama), "--json", str(tmp_path / "r.json"),
                 *FAST[4:]]) == 0
    again = json.loads((tmp_path / "r.json").read_text())
    assert again["quality"]["kl"] == pytest.approx(report["quality"]["kl"], rel=1e-5)
    assert "top-1 agreement" in capsys.readouterr().out


def test_recipe_with_set_override(saved_llama, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - method: magnitude\n    sparsity: 0.3\n    targets: mlp\n  - method: wanda\n    pattern: '2:4'\n    targets: attn\n")
    out = tmp_path / "o"
    assert main(["prune", "--model", str(saved_llama), "--recipe", str(recipe), "--set", "sparsity=0.25",
                 "--out", str(out), "--no-eval", "-q", *FAST[:4]]) == 0
    meta = json.loads((out / "trimformer.json").read_text())
    assert [s["method"] for s in meta["recipe"]] == ["magnitude", "wanda"]
    assert meta["calibration"]["source"] in ("docs", "mix")  # 'auto' resolved: the text actually used is recorded
    assert meta["recipe"][0]["sparsity"] == 0.25  # --set beats the recipe
    m = trimformer.load(out)
    assert (m.model.layers[0].mlp.up_proj.weight == 0).float().mean().item() == 0.25
    q = m.model.layers[0].self_attn.q_proj.weight
    assert ((q != 0).reshape(q.shape[0], -1, 4).sum(-1) <= 2).all()


@pytest.mark.parametrize("argv,match", [
    (["--method", "wanda", "--sparsity", "1.5"], "sparsity must be in"),
    (["--method", "wanda", "--pattern", "4:4"], "need 0 < N < M"),
    (["--method", "wandda"], "Did you mean 'wanda'"),
    (["--method", "wanda", "--calib-windows", "100000", "--calib-length", "32"], "windows (at most"),
    (["--method", "wanda", "--calib-length", "512"], "longer than the model's 256 positions"),
    (["--method", "wanda", "--set", "bogus=1"], "wanda has no setting 'bogus'"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(saved_llama, tmp_path, capsys, argv, match):
    out = tmp_path / "never"
    code = main(["-q", "prune", "--model", str(saved_llama), "--out", str(out), "--no-eval", *argv])
    assert code == 2
    assert match in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


def test_existing_output_is_refused_before_any_work(saved_llama, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert main(["-q", "prune", "--model", "does-not-matter", "--method", "wanda", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_unknown_model_is_reported(tmp_path, capsys):
    assert main(["-q", "info", "smolm2"]) == 2
    assert "Did you mean 'smollm2-135m'" in capsys.readouterr().err


def test_info_json(saved_llama, capsys):
    assert main(["info", str(saved_llama), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["family"] == "llama-like" and s["blocks"][0]["kv_heads"] == 2


def test_python_api_mirrors_the_cli(saved_llama, tokenizer):
    model, tok = trimformer.load(saved_llama, with_tokenizer=True)
    calib = trimformer.data.calibration_windows(tok, n=2, length=32)
    trimformer.prune_(model, trimformer.Recipe.one("wanda", sparsity=0.5), calibration=calib, progress=False)
    rep = trimformer.evaluate(model, tok, reference=trimformer.load(saved_llama), windows=2, kl_windows=1, length=32,
                              measure_speed=False, progress=False)
    assert rep["quality"]["ppl"] > rep["quality"]["ppl_reference"] * 0.5
    assert torch.isfinite(torch.tensor(rep["quality"]["kl"]))


def test_report_plots_a_frontier(saved_llama, tmp_path):
    runs = []
    for s in ("0.3", "0.6"):
        out = tmp_path / f"wanda-{s}"
        assert main(["prune", "--model", str(saved_llama), "--method", "wanda", "--sparsity", s, "--out", str(out),
                     *FAST]) == 0
        runs.append(str(out))
    assert main(["-q", "report", *runs, "--out", str(tmp_path / "cmp")]) == 0
    index = (tmp_path / "cmp" / "index.md").read_text()
    assert "wanda-0.3" in index and "wanda-0.6" in index
    png = (tmp_path / "cmp" / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "cmp" / "sparsity-wanda-0.3.png").is_file()
    assert main(["-q", "report", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2


def test_method_fields_work_as_flags(saved_llama, tmp_path):
    out = tmp_path / "w"
    assert main(["prune", "--model", str(saved_llama), "--method", "width", "--target", "params=0.8",
                 "--parts", "ffn", "--multiple-of=8", "--out", str(out), "--no-eval", *FAST[:4], "-q"]) == 0
    meta = json.loads((out / "trimformer.json").read_text())
    assert meta["recipe"][0]["target"] == "params=0.8" and meta["recipe"][0]["multiple_of"] == 8
    m = trimformer.load(out)
    widths = [layer.mlp.up_proj.weight.shape[0] for layer in m.model.layers]
    assert all(w % 8 == 0 and w < 128 for w in widths)


def test_unknown_method_flag_is_a_clear_error(saved_llama, tmp_path, capsys):
    code = main(["-q", "prune", "--model", str(saved_llama), "--method", "wanda", "--bogus", "1",
                 "--out", str(tmp_path / "x"), "--no-eval"])
    assert code == 2 and "wanda has no setting 'bogus'" in capsys.readouterr().err


def test_allocation_flag_wraps_a_weight_method(saved_llama, tmp_path):
    out = tmp_path / "owl"
    assert main(["prune", "--model", str(saved_llama), "--method", "wanda", "--sparsity", "0.5",
                 "--allocation", "owl", "--out", str(out), "--no-eval", *FAST[:4], "-q"]) == 0
    meta = json.loads((out / "trimformer.json").read_text())
    assert meta["recipe"][0]["method"] == "owl" and meta["recipe"][0]["base"] == "wanda"
    m = trimformer.load(out)
    a = trimformer.anatomy_of(m)
    zeros = sum(int((p.weight == 0).sum()) for _, p in a.projections())
    total = sum(p.weight.numel() for _, p in a.projections())
    assert zeros / total == pytest.approx(0.5, abs=0.01)


def test_model_help_names_every_bundled_model():
    from trimformer.commands import MODEL_HELP
    from trimformer.models.load import BUNDLED

    assert all(name in MODEL_HELP for name in BUNDLED)
