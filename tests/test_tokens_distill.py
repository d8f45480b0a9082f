"""Merge-aware distillation (recover/merging.py) on the tiny random BERT: gradients, loss, schedule, no-op."""

from __future__ import annotations

import copy

import pytest
import torch

from trimformer import tokens
from trimformer.data import doc_paragraphs, paragraphs, stdlib_docstrings, training_paragraphs
from trimformer.evaluate.encoder import paragraph_batches
from trimformer.recover.merging import DistillConfig, distill_loss, distill_merge_, pooled

L = 4  # blocks in the test model
MERGE = {"keep": 0.4, "features": "hidden"}


@pytest.fixture(scope="module")
def data():
    """40 random 'paragraphs' of 12-30 tokens ([CLS]=1 first, [SEP]=2 last)."""
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(40):
        n = int(torch.randint(10, 29, (1,), generator=g))
        out.append(torch.cat([torch.tensor([1]), torch.randint(3, 128, (n,), generator=g), torch.tensor([2])]))
    return out


def embed(model, seqs, method=None):
    """(n, H) mean-pooled embeddings, one sequence at a time, merged when `method` is given."""
    with torch.no_grad():
        if method is None:
            return torch.cat([pooled(model, s[None], torch.ones(1, len(s), dtype=torch.long)) for s in seqs])
        with tokens.prune(model, "merge", recover=L, **method):
            return torch.cat([pooled(model, s[None], torch.ones(1, len(s), dtype=torch.long)) for s in seqs])


def test_merged_forward_is_differentiable(bert, data):
    """Gradients reach the blocks before the first merge, and the values equal the no_grad forward."""
    model = copy.deepcopy(bert)
    ids = torch.stack([s[:12] for s in data[:3]])  # (3, 12)
    mask = torch.ones_like(ids)
    with tokens.prune(model, "merge", recover=L, **MERGE) as s:
        e = pooled(model, ids, mask)
        e.pow(2).sum().backward()
        assert s.counts[-1][0] < 12  # it did merge
    first = model.encoder.layer[0].attention.self.query.weight.grad
    assert first is not None and first.abs().sum() > 0
    with torch.no_grad(), tokens.prune(model, "merge", recover=L, **MERGE):
        torch.testing.assert_close(pooled(model, ids, mask), e.detach())


def test_distill_lowers_loss_keeps_schedule_and_dense(bert, data):
    model = copy.deepcopy(bert)
    dense0 = embed(model, data)
    probe = data[0][None]
    with torch.no_grad(), tokens.prune(model, "merge", recover=L, **MERGE) as s:
        model(input_ids=probe)
        counts0 = s.counts
    cfg = DistillConfig(steps=30, batch_size=8, lr=1e-3, warmup_steps=2, loss="cos+sim+rank")
    before = distill_loss(embed(model, data, MERGE), dense0, cfg)[0].item()
    hooks = {k for m in model.modules() for d in (m._forward_pre_hooks, m._forward_hooks) for k in d}
    distill_merge_(model, "merge", data, cfg, settings=MERGE, progress=False)
    after = distill_loss(embed(model, data, MERGE), dense0, cfg)[0].item()
    assert after < 0.7 * before, (before, after)
    assert model.trimformer_history[-1]["result"]["steps_run"] == 30
    with torch.no_grad(), tokens.prune(model, "merge", recover=L, **MERGE) as s:
        model(input_ids=probe)
        assert s.counts == counts0  # the schedule decides how many merge, before and after training
    # keep=1.0 is still exactly the (trained) dense model, and no hook was left behind
    with torch.no_grad():
        plain = model(input_ids=probe).last_hidden_state
        with tokens.prune(model, "merge", keep=1.0, recover=L):
            same = model(input_ids=probe).last_hidden_state
    torch.testing.assert_close(same, plain, atol=0, rtol=0)
    assert {k for m in model.modules() for d in (m._forward_pre_hooks, m._forward_hooks) for k in d} == hooks
    assert all(p.requires_grad for p in model.parameters())


def test_norms_only_and_lora(bert, data):
    model = copy.deepcopy(bert)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    distill_merge_(model, "merge", data, DistillConfig(steps=3, batch_size=8, train="norms"), settings=MERGE,
                   progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, w0[n])}
    assert changed and all("LayerNorm" in n or n.endswith(".bias") for n in changed)
    model = copy.deepcopy(bert)
    distill_merge_(model, "merge", data, DistillConfig(steps=3, batch_size=8, train="lora", lora_rank=2),
                   settings=MERGE, progress=False)
    names = {n for n, _ in model.named_parameters()}
    assert names == set(w0) and not any("lora" in n for n in names)  # adapters merged and removed
    q = "encoder.layer.1.attention.self.query.weight"
    assert not torch.equal(model.get_parameter(q), w0[q])


@pytest.mark.parametrize("settings, message", [
    ({"loss": "cos+foo"}, "joined terms from cos"),
    ({"train": "heads"}, "choose one of 'all', 'blocks', 'norms', 'lora'"),
    ({"batch_size": 1}, "batch_size must be >= 2"),
    ({"tau": 0.0}, "tau must be > 0"),
])
def test_bad_config(settings, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**settings)


def test_bad_data(bert, data, llama):
    with pytest.raises(ValueError, match="fewer than batch_size"):
        distill_merge_(bert, "merge", data[:3], DistillConfig(batch_size=4), progress=False)
    with pytest.raises(ValueError, match="1-D token-id tensors"):
        distill_merge_(bert, "merge", [torch.ones(2, 3, dtype=torch.long)] * 4, DistillConfig(batch_size=2),
                       progress=False)
    with pytest.raises(ValueError, match="decoder"):
        distill_merge_(llama, "merge", data, progress=False)


def test_cli_errors_before_loading(capsys, tmp_path):
    from trimformer.cli import main

    assert main(["distill-tokens", "--out", str(tmp_path / "m"), "--train-set", "los=cos"]) == 2
    assert "Did you mean 'loss'" in capsys.readouterr().err
    assert main(["distill-tokens", "--out", str(tmp_path / "m"), "--set", "treshold=0.4"]) == 2
    assert "Did you mean 'threshold'" in capsys.readouterr().err


def test_training_paragraphs_leave_out_the_p4_set(tokenizer):
    held = doc_paragraphs(tokenizer, 20)
    assert len(held) == 20 and all(32 <= len(tokenizer(p)["input_ids"]) <= 256 for p in held)
    batches = paragraph_batches(tokenizer, 20, batch=10)  # the P4 set is those paragraphs
    assert tokenizer.batch_decode(batches[0]["input_ids"][:1], skip_special_tokens=True)[0] == held[0]
    train = training_paragraphs(tokenizer, exclude=20)  # byte-level: equal ids are equal text
    ids = [tuple(t.tolist()) for t in train]
    assert len(ids) == len(set(ids)) > 100  # no copies either
    assert not set(ids) & {tuple(tokenizer(p)["input_ids"]) for p in held}
    assert all(16 <= len(t) <= 256 for t in ids)


def test_stdlib_docstrings_are_read_from_the_sources_without_running_them(tmp_path, monkeypatch):
    words = "with twelve words or more in it, so that it counts as a paragraph"
    (tmp_path / "json.py").write_text(
        f'"""The module, {words}.\n\nToo short to count."""\n'
        'raise RuntimeError("imported: code ran")\n\n'
        f'def f():\n    """A function, {words}."""\n    def inner():\n        """Nested, {words}."""\n\n'
        f'class C:\n    """A class, {words}."""\n')
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "__init__.py").write_text(f'"""A package, {words}."""\n')
    for name in ("_pydecimal", "notstdlib"):  # private, and not a standard-library name
        (tmp_path / f"{name}.py").write_text(f'"""Skipped, {words}."""\n')
    monkeypatch.setattr(paragraphs.sysconfig, "get_path", lambda name: str(tmp_path))
    assert stdlib_docstrings() == [f"A package, {words}.", f"The module, {words}.", f"A function, {words}.",
                                   f"A class, {words}."]
    (tmp_path / "zipfile.py").write_text("def broken(:\n")
    with pytest.raises(SyntaxError):  # not swallowed
        stdlib_docstrings()
