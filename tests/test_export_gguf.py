"""GGUF export read back with gguf's own reader: architecture, per-layer arrays, tensor names, shapes and values."""

from __future__ import annotations

import os
import warnings

import gguf
import numpy as np
import pytest
import torch
import transformers as T
from conftest import tiny, tiny_tokenizer

from trimformer.export.gguf import _rope_pairs, save_gguf, tokenizer_pre
from trimformer.export.layout import ExportError
from trimformer.io import OutputExistsError
from trimformer.models import anatomy_of
from trimformer.structure import surgery


def tiny4(family: str = "llama", **over) -> torch.nn.Module:
    """4 blocks, hidden 64, 4 query / 2 KV heads (head_dim 16), FFN 128."""
    torch.manual_seed(0)
    kw = {"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 128, "vocab_size": 259, "max_position_embeddings": 256, **over}
    if family == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**kw)).eval()
    return T.LlamaForCausalLM(T.LlamaConfig(tie_word_embeddings=True, **kw)).eval()


def hetero(model):
    """Every kind of per-block difference llama.cpp's deci architecture holds."""
    an = anatomy_of(model)
    surgery.prune_neurons(an.blocks[0], range(40))  # FFN 40
    surgery.prune_heads(an.blocks[1], [0, 1])  # 2 query heads, 1 KV head
    surgery.remove_mlp(an.blocks[2])  # attention only
    surgery.remove_attention(an, an.blocks[3])  # MLP only
    return model


def bpe_tokenizer():
    """The byte-level test tokenizer with one merge ("Ġt" in place of the last byte symbol), since llama.cpp needs
    merges; 259 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for t, i in tiny_tokenizer().get_vocab().items() if i < 258}
    vocab["Ġt"] = 258
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t")], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def read(path):
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in r.tensors}


def values(t) -> np.ndarray:
    """A tensor as float32 in numpy (out, in) order."""
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])


@torch.no_grad()
@pytest.mark.parametrize("family,arch", [("llama", "llama"), ("qwen2", "qwen2")])
def test_uniform_cut_keeps_the_family_architecture(family, arch, tmp_path):
    model = tiny4(family)
    for b in anatomy_of(model).blocks:
        surgery.prune_neurons(b, range(0, 128, 2))
    save_gguf(model, tmp_path / "m.gguf", qtype="f32")
    f, t = read(tmp_path / "m.gguf")
    assert f["general.architecture"] == arch
    assert f[f"{arch}.feed_forward_length"] == 64 and f[f"{arch}.block_count"] == 4
    assert f[f"{arch}.attention.head_count"] == 4 and f[f"{arch}.attention.head_count_kv"] == 2
    a = anatomy_of(model).blocks[2].attention
    q = a.q.weight if arch == "qwen2" else _rope_pairs(a.q.weight, 4)  # qwen2 rotates halves, as transformers
    np.testing.assert_array_equal(values(t["blk.2.attn_q.weight"]), q.numpy())
    assert ("blk.0.attn_q.bias" in t) == (family == "qwen2")
    assert ("output.weight" in t) == (family == "qwen2")  # tied embeddings are not written twice


@torch.no_grad()
def test_heterogeneous_cut_is_deci_with_per_layer_counts(tmp_path):
    model = hetero(tiny4())
    an = anatomy_of(model)
    surgery.remove_attention(an, an.blocks[2])  # block 2 now has neither sublayer: dropped from the file
    save_gguf(model, tmp_path / "m.gguf", qtype="f32")
    f, t = read(tmp_path / "m.gguf")
    assert f["general.architecture"] == "deci" and f["deci.block_count"] == 3
    assert f["deci.attention.head_count"] == [4, 2, 0]
    assert f["deci.attention.head_count_kv"] == [2, 1, 0]
    assert f["deci.feed_forward_length"] == [40, 128, 128]
    assert f["deci.attention.key_length"] == 16 and f["deci.rope.dimension_count"] == 16
    assert list(t["blk.1.attn_q.weight"].shape) == [64, 32] and list(t["blk.1.attn_k.weight"].shape) == [64, 16]
    assert "blk.2.attn_norm.weight" not in t and "blk.2.attn_q.weight" not in t  # block 3 of the model
    k = an.blocks[1].attention.k.weight
    np.testing.assert_array_equal(values(t["blk.1.attn_k.weight"]), _rope_pairs(k, 1).numpy())
    np.testing.assert_array_equal(values(t["blk.2.ffn_down.weight"]), an.blocks[3].mlp.down.weight.numpy())


@torch.no_grad()
def test_attention_only_block_gets_a_zero_neuron(tmp_path):
    """llama.cpp's deci graph skips the residual add of a layer with n_ff = 0: such a block adds an MLP of zeros."""
    save_gguf(hetero(tiny4()), tmp_path / "m.gguf", qtype="f32")
    f, t = read(tmp_path / "m.gguf")
    assert f["deci.feed_forward_length"] == [40, 128, 1, 128]
    assert not values(t["blk.2.ffn_up.weight"]).any() and not values(t["blk.2.ffn_down.weight"]).any()


def test_rope_pairs_is_llamacpps_rotation():
    """Rotating halves (transformers) then permuting rows == rotating consecutive pairs of permuted rows."""
    D, H = 8, 2
    W = torch.randn(H * D, 5)
    x = torch.randn(5)
    cos, sin = torch.cos(torch.arange(D // 2) * 0.3), torch.sin(torch.arange(D // 2) * 0.3)
    q = (W @ x).reshape(H, D)  # (H, D)
    half = torch.cat([q[:, : D // 2] * cos - q[:, D // 2:] * sin, q[:, D // 2:] * cos + q[:, : D // 2] * sin], -1)
    p = (_rope_pairs(W, H) @ x).reshape(H, D // 2, 2)  # (H, D/2, 2) consecutive pairs
    pairs = torch.stack([p[..., 0] * cos - p[..., 1] * sin, p[..., 1] * cos + p[..., 0] * sin], -1)
    torch.testing.assert_close(_rope_pairs(half.reshape(-1, 1), H).reshape(H, D // 2, 2), pairs)


@torch.no_grad()
@pytest.mark.parametrize("qtype,kind,tol", [("f16", "F16", 1e-3), ("bf16", "BF16", 1e-2), ("q8_0", "Q8_0", 2e-2)])
def test_types(qtype, kind, tol, tmp_path):
    model = hetero(tiny4())
    save_gguf(model, tmp_path / "m.gguf", qtype=qtype)
    f, t = read(tmp_path / "m.gguf")
    assert t["blk.0.ffn_up.weight"].tensor_type.name == kind
    assert t["blk.0.attn_norm.weight"].tensor_type.name == "F32"  # 1-D tensors stay f32
    if qtype == "q8_0":  # 40 FFN columns do not split into 32-blocks: f16, as llama.cpp's quantizer falls back
        assert t["blk.0.ffn_down.weight"].tensor_type.name == "F16"
    up = anatomy_of(model).blocks[0].mlp.up.weight.numpy()
    np.testing.assert_allclose(values(t["blk.0.ffn_up.weight"]), up, atol=tol * np.abs(up).max())


def test_tokenizer_metadata(tmp_path):
    tok = bpe_tokenizer()
    save_gguf(tiny4(), tmp_path / "m.gguf", tokenizer=tok, qtype="f32")
    f, _ = read(tmp_path / "m.gguf")
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.merges"] == ["Ġ t"]
    vocab = tok.get_vocab()
    assert f["tokenizer.ggml.tokens"][vocab["Ġ"]] == "Ġ" and len(f["tokenizer.ggml.tokens"]) == 259
    assert f["tokenizer.ggml.token_type"][tok.eos_token_id] == gguf.TokenType.CONTROL
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id and f["tokenizer.ggml.add_bos_token"] is False
    save_gguf(tiny4(vocab_size=300), tmp_path / "pad.gguf", tokenizer=tok, qtype="f32")
    f, _ = read(tmp_path / "pad.gguf")  # embedding rows past the tokenizer become unused tokens
    assert f["tokenizer.ggml.tokens"][299] == "[PAD299]" and f["tokenizer.ggml.token_type"][299] == 5
    with pytest.raises(ExportError, match="merges"):
        save_gguf(tiny4(), tmp_path / "x.gguf", tokenizer=tiny_tokenizer())  # no merges: llama.cpp cannot load it


def test_pre_tokenizer_names():
    split = {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"}, "behavior": "Isolated"}
    bytelevel = {"type": "ByteLevel", "use_regex": False}
    assert tokenizer_pre({"type": "Sequence", "pretokenizers": [split, bytelevel]}) == "qwen2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel", "use_regex": True}]}
    assert tokenizer_pre(digits) == "smollm"
    assert tokenizer_pre({"type": "Whitespace"}) is None


def test_refusals_and_atomic_writes(tmp_path):
    sparse = tiny4()
    W = anatomy_of(sparse).blocks[0].mlp.up.weight
    with torch.no_grad():
        W[:, ::2] = 0  # a 2:4-like pattern: 50 % zeros
    with pytest.raises(ExportError, match="compressed-tensors"):
        save_gguf(sparse, tmp_path / "s.gguf")
    save_gguf(sparse, tmp_path / "s.gguf", allow_zeros=True)
    with pytest.raises(ExportError, match="LLaMA-like"):
        save_gguf(tiny("gpt2"), tmp_path / "g.gguf")
    with pytest.raises(ExportError, match="q/k norms"):
        save_gguf(tiny("qwen3"), tmp_path / "q.gguf")
    with pytest.raises(ExportError, match=r"\.gguf"):
        save_gguf(tiny4(), tmp_path / "m.bin")
    with pytest.raises(OutputExistsError):
        save_gguf(tiny4(), tmp_path / "s.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.gguf"]  # nothing half-written
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "s.gguf").stat().st_mode & 0o777 == 0o666 & ~umask  # not the temp file's private mode


def test_q4_k_m_needs_llamacpp(tmp_path):
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        with pytest.raises(ExportError, match="llama-quantize"):
            save_gguf(tiny4(), tmp_path / "m.gguf", qtype="q4_k_m")
        assert not list(tmp_path.iterdir())
    else:
        save_gguf(hetero(tiny4()), tmp_path / "m.gguf", qtype="q4_k_m")
        assert read(tmp_path / "m.gguf")[0]["general.file_type"] == 15


@torch.no_grad()
def test_unaligned_ffn_widths_are_named_in_a_warning(tmp_path, recwarn):
    """llama.cpp's prefill is slow at FFN widths that are not a multiple of 32: the export says where, and how to
    avoid it; aligned widths and removed MLPs (written as one zero neuron) pass quietly."""
    model = tiny4(num_hidden_layers=6)
    an = anatomy_of(model)
    save_gguf(model, tmp_path / "a.gguf", qtype="f32")
    surgery.prune_neurons(an.blocks[0], range(96))
    surgery.remove_mlp(an.blocks[5])
    save_gguf(model, tmp_path / "b.gguf", qtype="f32")
    assert not [w for w in recwarn if "GGUF" in str(w.message)]
    for i in (1, 2, 4):
        surgery.prune_neurons(an.blocks[i], range(40 + i))
    with pytest.warns(UserWarning, match=r"FFN width 41, 42, 44 in block\(s\) 1-2, 4 is not a multiple of 32: "
                                         r".*prune with --multiple-of 32"):
        save_gguf(model, tmp_path / "c.gguf", qtype="f32")


@torch.no_grad()
def test_kquant_files_name_ffn_widths_off_the_256_block(tmp_path):
    """Q4_K_M stores down projections whose rows are not a multiple of 256 in a bigger fallback type: the export
    names those blocks for k-quants only (an f32 file of the same model is quiet about it)."""
    model = tiny4(num_hidden_layers=3, intermediate_size=512)
    an = anatomy_of(model)
    surgery.prune_neurons(an.blocks[1], range(256))  # 256 kept: one k-quant block
    surgery.prune_neurons(an.blocks[2], range(480))  # 480 kept: fine for f32 / q8_0, not for k-quants
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        save_gguf(model, tmp_path / "a.gguf", qtype="f32")
    assert not [w for w in rec if "k-quant" in str(w.message)]
    with pytest.warns(UserWarning, match=r"GGUF q4_k_m: FFN width 480 in block\(s\) 2 is not a multiple of 256 "
                                         r".*prune with --multiple-of 256"):
        try:
            save_gguf(model, tmp_path / "b.gguf", qtype="q4_k_m")
        except ExportError:  # no llama-cpp-python here: the warning comes first
            pass


@torch.no_grad()
def test_llamacpp_runs_the_file(tmp_path):
    """Optional: stock llama.cpp (llama-cpp-python) gives our logits on a heterogeneous cut."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = hetero(tiny4(hidden_size=128))
    save_gguf(model, tmp_path / "m.gguf", tokenizer=bpe_tokenizer(), qtype="f32")
    ids = torch.randint(3, 259, (24,), generator=torch.Generator().manual_seed(0))
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(ids.tolist())
    got = torch.tensor(np.asarray(llm.scores)[: len(ids)])
    torch.testing.assert_close(got, model(input_ids=ids[None]).logits[0], atol=1e-3, rtol=1e-3)
