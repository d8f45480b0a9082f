"""`trimformer recover` end to end on tiny models with a tiny word-level tokenizer."""

from __future__ import annotations

import copy
import json
import random

import torch
from conftest import VOCAB, tiny

import trimformer
from trimformer import cli


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


def test_cli_recover_heals_keeps_zeros_and_refuses_existing_output(tmp_path, capsys):
    teacher = tiny("llama")
    teacher.save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    student = copy.deepcopy(teacher)
    trimformer.prune_(student, trimformer.build("magnitude", {"sparsity": 0.5}), progress=False)
    student.save_pretrained(tmp_path / "pruned")
    rng = random.Random(0)
    (tmp_path / "train.txt").write_text(" ".join(f"w{rng.randrange(1, VOCAB)}" for _ in range(400)))
    argv = ["-q", "recover", str(tmp_path / "pruned"), "--teacher", str(tmp_path / "dense"), "--data",
            str(tmp_path / "train.txt"), "--steps", "3", "--seq-len", "16", "--batch-size", "2", "--lr", "1e-2",
            "--out", str(tmp_path / "healed"), "--checkpoint-every", "2", "--set", "warmup_steps=0"]
    assert cli.main(argv) == 0
    healed = trimformer.load(tmp_path / "healed")
    for (n, a), b in zip(student.named_parameters(), healed.parameters()):
        assert a.shape == b.shape
        if a.dim() == 2 and "layers" in n:
            assert torch.equal(a == 0, b == 0), n
    assert not torch.equal(healed.model.layers[0].mlp.up_proj.weight, student.model.layers[0].mlp.up_proj.weight)
    meta = json.loads((tmp_path / "healed" / "trimformer_recover.json").read_text())
    assert meta["result"]["steps_run"] == 3 and len(meta["result"]["losses"]) == 3
    assert not (tmp_path / "healed.checkpoints").exists()  # removed after a successful save

    assert cli.main(argv) == 2  # the output exists: refused before any training
    bad = [a if a != str(tmp_path / "healed") else str(tmp_path / "other") for a in argv[:-2]]
    assert cli.main([*bad, "--set", "temprature=2"]) == 2  # unknown setting: did-you-mean error
    assert "Did you mean 'temperature'" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
