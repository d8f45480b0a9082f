"""GGUF files for llama.cpp, written directly with the `gguf` library (no converter script, no HF round trip).

A uniform cut is written as the family's own architecture (`llama` for llama / mistral, `qwen2`); a heterogeneous
one as llama.cpp's `deci` architecture, whose loader reads `{arch}.attention.head_count`, `.head_count_kv` and
`{arch}.feed_forward_length` per layer (`get_key_or_arr`), so per-block query heads, KV heads and FFN widths all
hold. What llama.cpp's deci graph (`src/models/deci.cpp`, llama-cpp-python 0.3.36) does with the counts:
  head_count 0            attention-free layer: no attention tensors, no attn_norm (the residual passes through);
  head_count_kv 0, n > 0  "linear attention" (only attn_output) — never written here;
  feed_forward_length 0   the layer `continue`s before the residual add, so it is exact only when the attention is
                          gone too: blocks with neither sublayer are dropped from the file, and a block that keeps
                          its attention but lost its MLP gets a one-neuron MLP of zeros (adds exactly 0) instead.
Rotary embeddings: llama.cpp's `llama` and `deci` rotate consecutive pairs, transformers rotates halves, so q/k rows
are permuted per head (as llama.cpp's converter does); `qwen2` rotates halves (NEOX) and needs no permutation.

Types: f32, f16, bf16 and q8_0 are encoded by `gguf.quants` (1-D tensors stay f32; a matrix whose rows do not split
into the type's blocks falls back to f16, as llama.cpp's quantizer does); q4_k_m is llama.cpp's own mixture, which
`gguf` cannot write: it is made by llama.cpp's quantizer through llama-cpp-python when that is installed.
The tokenizer (byte-level BPE) goes in as `tokenizer.ggml.*`, so llama.cpp runs the file on its own.
"""

from __future__ import annotations

import ctypes
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import MODEL_TENSOR as T
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as F
from torch import nn

from ..io import OutputExistsError
from .layout import EngineLayout, ExportError, engine_layout

QTYPES: dict[str, tuple[Q | None, F]] = {
    "f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0), "q4_k_m": (None, F.MOSTLY_Q4_K_M),
}
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # uniform cuts keep the family's architecture
NEOX = {"qwen2"}  # architectures that rotate halves, like transformers
FFN_ALIGN = 32  # FFN widths llama.cpp runs at full speed: tinyBLAS f32 needs 16 (AVX-512), q8_0 blocks are 32 wide
KQUANT_ALIGN = 256  # k-quant super-blocks (q4_K, q6_K): llama.cpp gives narrower rows a bigger fallback type

# Split regexes of byte-level BPE pre-tokenizers (as tokenizer.json holds them) -> llama.cpp's pre-tokenizer name
_SPLITS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


def _name(kind: T, bid: int | None = None, suffix: str = "weight") -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + f".{suffix}"


def _rope_pairs(W: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers' half-split rotary layout -> llama.cpp's consecutive pairs, per head (rows of W or a bias)."""
    D = W.shape[0] // n_head
    return W.reshape(n_head, 2, D // 2, *W.shape[1:]).transpose(1, 2).reshape(W.shape)  # (H, D/2, 2, ...) rows


def _encode(W: torch.Tensor, qtype: Q) -> tuple[np.ndarray, Q | None]:
    x = W.detach().to(torch.float32).cpu().numpy()
    if x.ndim == 1 or qtype == Q.F32:
        return x, None
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if qtype == Q.F16 or x.shape[-1] % block:
        return x.astype(np.float16), None
    return gguf.quants.quantize(x, qtype), qtype


def _tensors(layout: EngineLayout, arch: str) -> list[tuple[str, torch.Tensor]]:
    an = layout.anatomy
    out = [(_name(T.TOKEN_EMBD), an.embed.weight), (_name(T.OUTPUT_NORM), an.final_norm.weight)]
    if not layout.tied:
        out.append((_name(T.OUTPUT), an.head.weight))
    permute = arch not in NEOX
    i = 0
    for b, s in zip(an.blocks, layout.layers):
        if s.empty:
            continue  # see the module docstring: dropped, not written as a layer with n_ff = 0
        if b.attention is not None:
            a = b.attention
            out.append((_name(T.ATTN_NORM, i), b.norms["attn"].weight))
            for kind, p, heads in ((T.ATTN_Q, a.q, a.num_heads), (T.ATTN_K, a.k, a.num_kv_heads),
                                   (T.ATTN_V, a.v, None), (T.ATTN_OUT, a.o, None)):
                W, bias = p.weight, p.bias
                if permute and heads:
                    W = _rope_pairs(W, heads)
                    bias = None if bias is None else _rope_pairs(bias, heads)
                out.append((_name(kind, i), W))
                if bias is not None:
                    out.append((_name(kind, i, "bias"), bias))
        if b.mlp is not None:
            out.append((_name(T.FFN_NORM, i), b.norms["mlp"].weight))
            for kind, p in ((T.FFN_GATE, b.mlp.gate), (T.FFN_UP, b.mlp.up), (T.FFN_DOWN, b.mlp.down)):
                out.append((_name(kind, i), p.weight))
                if p.bias is not None:
                    out.append((_name(kind, i, "bias"), p.bias))
        else:  # attention kept, MLP removed: one zero neuron (llama.cpp drops the attention of an n_ff = 0 layer)
            d = layout.hidden
            out += [(_name(T.FFN_NORM, i), torch.ones(d)), (_name(T.FFN_GATE, i), torch.zeros(1, d)),
                    (_name(T.FFN_UP, i), torch.zeros(1, d)), (_name(T.FFN_DOWN, i), torch.zeros(d, 1))]
        i += 1
    return out


def gguf_layers(layout: EngineLayout) -> dict[str, list[int]]:
    """The per-layer arrays written for the deci architecture (removed-everything blocks dropped)."""
    kept = [s for s in layout.layers if not s.empty]
    return {"head_count": [s.heads for s in kept], "head_count_kv": [s.kv_heads for s in kept],
            "feed_forward_length": [s.ffn or (1 if s.heads else 0) for s in kept]}


def _rope(w: gguf.GGUFWriter, layout: EngineLayout, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    rope = layout.rope
    kind = rope.get("rope_type", "default")
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if kind == "default":
        return []
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
        return []
    if kind == "llama3":  # llama.cpp multiplies each rotary wavelength by a stored factor (rope_freqs)
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        D, base = layout.head_dim, float(rope["rope_theta"])
        plain = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
        return [(_name(T.ROPE_FREQS), (plain / scaled.to(torch.float64)).float())]
    raise ExportError(f"rope_type {kind!r} is not written to GGUF by trimformer (default, linear, llama3 are)")


def tokenizer_pre(pre_tokenizer: dict | None) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer (tokenizer.json's `pre_tokenizer`), or None."""
    if not pre_tokenizer:
        return None
    kind = pre_tokenizer.get("type")
    if kind == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return "gpt-2"
    parts = pre_tokenizer.get("pretokenizers", []) if kind == "Sequence" else []
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        return _SPLITS.get((parts[0].get("pattern") or {}).get("Regex"))
    return None


def _tokenizer(w: gguf.GGUFWriter, tokenizer: Any, n_vocab: int, pre: str | None) -> None:
    if tokenizer is None:  # token ids only (llama.cpp's "none" vocabulary)
        w.add_tokenizer_model("none")
        return
    j = json.loads(tokenizer.backend_tokenizer.to_str())
    m = j["model"]
    if m.get("type") != "BPE" or m.get("byte_fallback") or not m.get("merges"):
        raise ExportError(f"tokenizer model {m.get('type')!r}: trimformer writes byte-level BPE tokenizers (with "
                          "merges, which llama.cpp requires) to GGUF; for others run llama.cpp's convert_hf_to_gguf.py "
                          "on a uniform --format hf export, or pass no tokenizer (token ids only)")
    pre = pre or tokenizer_pre(j.get("pre_tokenizer"))
    if pre is None:
        raise ExportError(f"no llama.cpp pre-tokenizer name matches {json.dumps(j.get('pre_tokenizer'))[:200]}; "
                          "pass tokenizer_pre= (CLI: --gguf-pre NAME, a name from llama.cpp's llama-vocab.cpp)")
    tokens: list[str | None] = [None] * max(n_vocab, len(tokenizer))
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for text, i in m["vocab"].items():
        tokens[i] = text
    for a in j.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    if len(tokens) > n_vocab:
        raise ExportError(f"the tokenizer has {len(tokens)} tokens, the embedding only {n_vocab} rows")
    for i, t in enumerate(tokens):
        if t is None:  # embedding rows past the tokenizer (padding)
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([mg if isinstance(mg, str) else " ".join(mg) for mg in m.get("merges", [])])
    for add, tid in ((w.add_bos_token_id, tokenizer.bos_token_id), (w.add_eos_token_id, tokenizer.eos_token_id),
                     (w.add_unk_token_id, tokenizer.unk_token_id), (w.add_pad_token_id, tokenizer.pad_token_id)):
        if tid is not None:
            add(int(tid))
    probe = tokenizer("a")["input_ids"]
    w.add_add_bos_token(tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    w.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        w.add_chat_template(tokenizer.chat_template)


def unaligned_ffn(layout: EngineLayout, multiple: int = FFN_ALIGN) -> dict[int, int]:
    """Block index -> FFN width, for the kept MLPs whose width is not a multiple of `multiple`."""
    return {i: s.ffn for i, s in enumerate(layout.layers) if s.ffn and s.ffn % multiple}


def _spans(idx: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for j, i in enumerate(idx):
        start = i if start is None else start
        if j + 1 == len(idx) or idx[j + 1] != i + 1:
            out.append(f"{start}-{i}" if i > start else str(i))
            start = None
    return ", ".join(out)


def warn_unaligned(layout: EngineLayout) -> None:
    """Warn when an FFN width is not a multiple of 32: llama.cpp's prefill is then far slower (p5_engines.md: a
    width-cut smollm2-135m at FFN 1017 prefills at 0.68x the dense speed, at 992 at 1.20x)."""
    if bad := unaligned_ffn(layout):
        widths = sorted(set(bad.values()))
        warnings.warn(f"GGUF: FFN width {', '.join(map(str, widths[:4]))}{', ...' if len(widths) > 4 else ''} in "
                      f"block(s) {_spans(sorted(bad))} is not a multiple of {FFN_ALIGN}: llama.cpp's fast matrix "
                      f"kernels need the inner dimension a multiple of 16 (32 for q8_0 and k-quant blocks), so its "
                      f"prefill falls back to a slow generic kernel there; prune with --multiple-of {FFN_ALIGN}",
                      stacklevel=3)


def warn_kquant_unaligned(layout: EngineLayout, qtype: str) -> None:
    """Warn when a k-quant file cannot hold an FFN at its type: llama.cpp's quantizer stores an ffn_down whose rows
    are not a multiple of 256 in q5_0 / q8_0, so the file (and bandwidth-bound decode) shrinks less than the
    parameters (p5_engines_q4.md: smollm2-135m width-cut to FFN 992 keeps 0.79 of the parameters in 0.85 of the
    bytes, and decodes at 1.14x dense against 1/params 1.27)."""
    if bad := unaligned_ffn(layout, KQUANT_ALIGN):
        widths = sorted(set(bad.values()))
        warnings.warn(f"GGUF {qtype}: FFN width {', '.join(map(str, widths[:4]))}{', ...' if len(widths) > 4 else ''} "
                      f"in block(s) {_spans(sorted(bad))} is not a multiple of {KQUANT_ALIGN} (the k-quant block): "
                      f"llama.cpp stores those down projections in a larger fallback type, so the file and decode "
                      f"speed shrink less than the parameters; prune with --multiple-of {KQUANT_ALIGN}", stacklevel=3)


def write_gguf(model: nn.Module, path: str | os.PathLike, *, tokenizer: Any = None, qtype: str = "f16",
               allow_zeros: bool = False, tokenizer_pre: str | None = None) -> dict[str, Any]:
    """Write `model` to the GGUF file `path` (not atomic: see save_gguf). Returns what was written. Warns when
    an FFN width is not a multiple of 32 (warn_unaligned)."""
    if qtype not in QTYPES or QTYPES[qtype][0] is None:
        raise ExportError(f"GGUF type {qtype!r}: write_gguf encodes {', '.join(k for k, v in QTYPES.items() if v[0])}")
    layout = engine_layout(model, allow_zeros=allow_zeros)
    warn_unaligned(layout)
    arch = ARCH[layout.model_type] if layout.uniform else "deci"
    target, ftype = QTYPES[qtype]
    w = gguf.GGUFWriter(str(path), arch, use_temp_file=True)
    w.add_name(str(getattr(model, "trimformer_source", None) or "trimformer export"))
    w.add_file_type(int(ftype))
    if target not in (Q.F32, Q.F16):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    layers = gguf_layers(layout)
    w.add_block_count(len(layers["head_count"]))
    w.add_context_length(layout.max_positions)
    w.add_embedding_length(layout.hidden)
    if arch == "deci":
        w.add_head_count(layers["head_count"])
        w.add_head_count_kv(layers["head_count_kv"])
        w.add_feed_forward_length(layers["feed_forward_length"])
    else:
        s = layout.layers[0]
        w.add_head_count(s.heads)
        w.add_head_count_kv(s.kv_heads)
        w.add_feed_forward_length(s.ffn)
    w.add_key_length(layout.head_dim)
    w.add_value_length(layout.head_dim)
    w.add_rope_dimension_count(layout.head_dim)
    w.add_layer_norm_rms_eps(layout.eps)
    w.add_vocab_size(layout.vocab)
    extra = _rope(w, layout, model)
    _tokenizer(w, tokenizer, layout.vocab, tokenizer_pre)
    allowed = set(gguf.MODEL_TENSORS[next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)])
    names = {gguf.TENSOR_NAMES[k].format(bid=i): k for k in allowed for i in range(len(layers["head_count"]))}
    written = {}
    for name, W in _tensors(layout, arch) + extra:
        if name.rpartition(".")[0] not in names:
            raise ExportError(f"internal: tensor {name} is not part of llama.cpp's {arch} architecture")
        data, raw = _encode(W, Q.F32 if name == _name(T.ROPE_FREQS) else target)
        w.add_tensor(name, data, raw_dtype=raw)
        written[name] = (raw if raw is not None else Q.F32 if data.dtype == np.float32 else Q.F16).name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"arch": arch, "type": qtype, "layers": layers, "tensors": written}


def save_gguf(model: nn.Module, out: str | os.PathLike, *, tokenizer: Any = None, qtype: str = "f16",
              overwrite: bool = False, allow_zeros: bool = False, tokenizer_pre: str | None = None) -> Path:
    """Write the GGUF file `out` atomically (a temp file beside it, then a rename); q4_k_m through llama.cpp."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise ExportError(f"GGUF output {str(out)!r} should end in .gguf")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output file {str(out)!r} exists; choose another or pass --overwrite")
    if qtype not in QTYPES:
        raise ExportError(f"GGUF type {qtype!r}; choose one of {', '.join(QTYPES)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)[1])
    full = tmp.with_suffix(".f32.tmp")
    try:
        if QTYPES[qtype][0] is None:
            warn_kquant_unaligned(engine_layout(model, allow_zeros=allow_zeros), qtype)
            write_gguf(model, full, tokenizer=tokenizer, qtype="f32", allow_zeros=allow_zeros,
                       tokenizer_pre=tokenizer_pre)
            llamacpp_quantize(full, tmp, qtype)
        else:
            write_gguf(model, tmp, tokenizer=tokenizer, qtype=qtype, allow_zeros=allow_zeros,
                       tokenizer_pre=tokenizer_pre)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; the result is an ordinary file
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        full.unlink(missing_ok=True)
    return out


def llamacpp_quantize(src: str | os.PathLike, dst: str | os.PathLike, qtype: str) -> None:
    """Quantise a GGUF with llama.cpp's own quantizer (llama-cpp-python's binding of llama_model_quantize)."""
    try:
        import llama_cpp
    except ImportError:
        raise ExportError(
            f"{qtype} is llama.cpp's own quantisation, which the gguf library cannot write: install llama-cpp-python, "
            f"or write --gguf-type f32 and run `llama-quantize model.gguf model-{qtype}.gguf {qtype.upper()}`"
        ) from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(QTYPES[qtype][1])
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise ExportError(f"llama.cpp could not quantise {src} to {qtype}")
