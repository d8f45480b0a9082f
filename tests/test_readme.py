"""Every Python block of README.md runs as written (on tiny models), so an example can never rot.

The blocks run in order in one namespace, as a reader would paste them. What a block uses without defining
(`model`, `inputs`, `encoder`, `batch`, `llm`, `student`, `teacher`, `windows`) is provided here; the bundled
model names load tiny random models of the same families, task data is a tiny copy of the data packages' layout
(conftest), and the protocol sizes (64 windows of 512 tokens) are cut to a few short windows so the test stays fast. Only sizes change: every call, name and keyword
is the README's own.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers as T
from conftest import VOCAB, tiny, tiny_tokenizer

import trimformer
from trimformer import data
from trimformer.models.load import load as real_load

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 3


def six_blocks(family: str) -> torch.nn.Module:
    """README's encoder is the 6-block MiniLM (recover=6), and LazyLLM prunes from block 4."""
    torch.manual_seed(0)
    if family == "bert":
        return T.BertModel(T.BertConfig(num_hidden_layers=6, hidden_size=64, num_attention_heads=4,
                                        intermediate_size=128, vocab_size=VOCAB)).eval()
    return T.LlamaForCausalLM(T.LlamaConfig(num_hidden_layers=6, hidden_size=64, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=128, vocab_size=VOCAB)).eval()


@pytest.fixture
def namespace(monkeypatch, tmp_path, task_data):
    tok = tiny_tokenizer()
    models = {"smollm2-135m": lambda: tiny("llama"), "minilm-l6": lambda: tiny("bert")}

    def load(name, *, with_tokenizer=False, **_):
        model = models[str(name)]() if str(name) in models else real_load(name)
        return (model, tok) if with_tokenizer else model

    real_windows, real_eval = data.calibration_windows, trimformer.evaluate
    monkeypatch.setattr(trimformer, "load", load)
    monkeypatch.setattr(data, "calibration_windows",
                        lambda tk, source="docs", n=64, length=512, **kw: real_windows(tk, source, min(n, 2), min(length, 32), **kw))
    monkeypatch.setattr(trimformer, "evaluate", lambda m, t, **kw: real_eval(
        m, t, **{**kw, "windows": 2, "kl_windows": 1, "length": 32, "measure_speed": False, "progress": False}))
    monkeypatch.chdir(tmp_path)
    ids = torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(0))
    return {"model": tiny("llama"), "llm": six_blocks("llama"), "inputs": {"input_ids": ids},
            "encoder": six_blocks("bert"), "batch": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            "student": tiny("llama", seed=1), "teacher": tiny("llama"),
            "windows": torch.randint(3, 250, (4, 16), generator=torch.Generator().manual_seed(1))}


def test_every_readme_python_block_runs(namespace):
    for i, block in enumerate(python_blocks()):
        code = re.sub(r"max_new_tokens=\d+", "max_new_tokens=4", block)
        code = re.sub(r"RecoverConfig\(steps=\d+", "RecoverConfig(steps=2", code)
        try:
            exec(compile(code, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # noqa: BLE001  (any failure of a README example is this test's failure)
            raise AssertionError(f"README python block {i + 1} fails: {type(e).__name__}: {e}\n{block}") from e
