"""Physical surgery: remove FFN neurons, query heads, KV groups, sublayers and blocks (hidden channels: channels.py).

Every function takes an Anatomy (or one of its blocks) and the indices to KEEP, replaces the
parameters by smaller ones in place, fixes the module attributes the forward pass reads, and
`sync_config` makes `model.config` describe the new tensors (per-layer shapes when they differ).
`assign` writes a re-fitted output projection (importance.least_squares) over the columns that stayed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..models import Anatomy, Block, Proj


class SurgeryError(ValueError):
    pass


def kept_index(keep: Sequence[int] | torch.Tensor, size: int, what: str) -> torch.Tensor:
    """`keep` as sorted indices into `size` things, refused (SurgeryError naming `what`) if out of range or repeated."""
    idx = torch.as_tensor(keep, dtype=torch.long).flatten().sort().values
    if idx.numel() and (idx[0] < 0 or idx[-1] >= size):
        raise SurgeryError(f"{what}: indices must be in [0, {size}), got {idx.tolist()[:8]}...")
    if idx.unique().numel() != idx.numel():
        raise SurgeryError(f"{what}: indices to keep contain duplicates")
    return idx


def new_param(like: nn.Parameter, data: torch.Tensor) -> nn.Parameter:
    """A parameter holding a copy of `data`, trainable as `like` was."""
    return nn.Parameter(data.contiguous().clone(), requires_grad=like.requires_grad)


@torch.no_grad()
def keep_outputs(p: Proj, idx: torch.Tensor) -> None:
    """Keep output features `idx` of a projection (rows of its (out, in) weight, and its bias)."""
    m = p.module
    m.weight = new_param(m.weight, m.weight[:, idx] if p.transposed else m.weight[idx])
    if getattr(m, "bias", None) is not None:
        m.bias = new_param(m.bias, m.bias[idx])
    if p.transposed:
        m.nf = idx.numel()  # Conv1D reads nf in forward
    else:
        m.out_features = idx.numel()


@torch.no_grad()
def keep_inputs(p: Proj, idx: torch.Tensor) -> None:
    """Keep input features `idx` of a projection (columns of its (out, in) weight)."""
    m = p.module
    m.weight = new_param(m.weight, m.weight[idx] if p.transposed else m.weight[:, idx])
    if p.transposed:
        m.nx = idx.numel()
    else:
        m.in_features = idx.numel()


@torch.no_grad()
def assign(p: Proj, new: tuple[torch.Tensor, torch.Tensor | None] | None) -> None:
    """Give projection `p` the (out, in) weight W and bias b of `new` = (W, b) (b None: bias unchanged);
    None leaves it as it is."""
    if new is None:
        return
    W, b = new
    p.weight.copy_(W.to(p.weight.dtype))
    if b is not None:
        p.bias.copy_(b.to(p.bias.dtype))


# -- FFN neurons --------------------------------------------------------------------------------
def prune_neurons(block: Block, keep: Sequence[int] | torch.Tensor) -> None:
    """Keep FFN neurons `keep` of one block (rows of up/gate, columns of down). Empty keeps none."""
    mlp = block.mlp
    if mlp is None:
        raise SurgeryError(f"block {block.index} has no MLP")
    idx = kept_index(keep, mlp.intermediate_size, f"block {block.index} FFN neurons")
    for p in (mlp.up, mlp.gate):
        if p is not None:
            keep_outputs(p, idx)
    keep_inputs(mlp.down, idx)
    if isinstance(getattr(mlp.module, "intermediate_size", None), int):
        mlp.module.intermediate_size = idx.numel()


class RemovedMLP(nn.Module):
    """Stands in for a removed MLP sublayer: adds 0 to the residual stream."""

    trimformer_removed = True

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


@torch.no_grad()
def remove_mlp(block: Block) -> None:
    """Remove the MLP sublayer so that it adds exactly 0 to the residual (pre-norm models only).

    A separate MLP module is replaced by `RemovedMLP`; one that lives on the layer itself (OPT)
    keeps zero neurons and no bias.
    """
    if block.mlp is None:
        raise SurgeryError(f"block {block.index}: the MLP is already removed")
    if not block.pre_norm:
        raise SurgeryError(f"block {block.index}: removing a sublayer needs a pre-norm model (post-norm keeps its norm)")
    if block.mlp.module is not block.module:
        setattr(block.module, _child_name(block.module, block.mlp.module), RemovedMLP())
        return
    prune_neurons(block, [])
    if block.mlp.down.bias is not None:
        block.mlp.down.bias.zero_()


# -- attention heads and KV groups --------------------------------------------------------------
def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()  # (h * D,)


def prune_heads(block: Block, keep_heads: Sequence[int] | torch.Tensor, keep_kv: Sequence[int] | torch.Tensor | None = None) -> None:
    """Keep query heads `keep_heads` and KV heads `keep_kv` (default: those the kept query heads use).

    GQA stays valid: every kept KV group must keep the same number of query heads, and a query head
    can only be kept with its KV group. Without GQA (H == H_kv), query and KV heads go together.
    """
    a = block.attention
    if a is None:
        raise SurgeryError(f"block {block.index} has no attention")
    H, Hkv, D = a.num_heads, a.num_kv_heads, a.head_dim
    heads = kept_index(keep_heads, H, f"block {block.index} query heads")
    if heads.numel() == 0:
        raise SurgeryError(f"block {block.index}: keeping 0 heads; use remove_attention to drop the sublayer")
    group = H // Hkv
    kv_of = heads // group  # KV head of each kept query head
    if keep_kv is None:
        kv = kv_of.unique()
    else:
        kv = kept_index(keep_kv, Hkv, f"block {block.index} KV heads")
        if not set(kv_of.tolist()) <= set(kv.tolist()):
            raise SurgeryError(f"block {block.index}: a kept query head uses a removed KV head")
    if Hkv == H:
        kv = heads  # plain multi-head attention: q, k, v heads are the same
    else:
        counts = torch.bincount(kv_of, minlength=Hkv)[kv]
        if counts.min() != counts.max() or counts.min() == 0:
            raise SurgeryError(
                f"block {block.index}: GQA needs the same number of query heads per kept KV group, "
                f"got {counts.tolist()} over KV groups {kv.tolist()}"
            )
    q_rows, kv_rows = _head_rows(heads, D), _head_rows(kv, D)
    if a.qkv is not None:  # fused [q | k | v] rows (GPT-2)
        width_q, width_kv = H * D, Hkv * D
        keep_outputs(a.qkv, torch.cat([q_rows, width_q + kv_rows, width_q + width_kv + kv_rows]))
    else:
        keep_outputs(a.q, q_rows)
        keep_outputs(a.k, kv_rows)
        keep_outputs(a.v, kv_rows)
    keep_inputs(a.o, q_rows)
    _set_head_attrs(a.module, heads.numel(), kv.numel(), D)
    a.num_heads, a.num_kv_heads = heads.numel(), kv.numel()


def _set_head_attrs(m: nn.Module, H: int, Hkv: int, D: int) -> None:
    """The attributes each family's attention forward reads (whichever exist)."""
    for name, value in (
        ("num_heads", H), ("num_attention_heads", H), ("n_head", H),
        ("num_key_value_heads", Hkv), ("num_key_value_groups", H // Hkv),
        ("all_head_size", H * D), ("split_size", H * D), ("embed_dim", H * D),
    ):
        if hasattr(m, name) and not isinstance(getattr(m, name), nn.Module):
            setattr(m, name, value)
    for child in m.children():  # BERT: BertAttention.self holds the heads
        if hasattr(child, "num_attention_heads"):
            _set_head_attrs(child, H, Hkv, D)


class RemovedAttention(nn.Module):
    """Stands in for a removed attention sublayer: adds 0 to the residual stream.

    It still records the sequence length in the KV cache (a (B, 1, T, 1) tensor) so that
    position bookkeeping of generation keeps working when this layer is the first one.
    """

    trimformer_removed = True

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and hasattr(cache, "update"):
            B, T = hidden_states.shape[:2]
            stub = hidden_states.new_zeros(B, 1, T, 1)  # (B, 1, T, 1)
            cache.update(stub, stub, self.layer_idx)
        return torch.zeros_like(hidden_states), None


def remove_attention(anatomy: Anatomy, block: Block) -> None:
    """Replace a block's attention sublayer by `RemovedAttention` (pre-norm models only)."""
    if block.attention is None:
        raise SurgeryError(f"block {block.index}: attention is already removed")
    if not block.pre_norm:
        raise SurgeryError(f"block {block.index}: removing a sublayer needs a pre-norm model (post-norm keeps its norm)")
    name = _child_name(block.module, block.attention.module)
    setattr(block.module, name, RemovedAttention(getattr(block.attention.module, "layer_idx", block.index)))


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    for n, c in parent.named_children():
        if c is child:
            return n
    raise SurgeryError("sublayer module is not a direct child of its block")


# -- whole blocks -------------------------------------------------------------------------------
def remove_blocks(anatomy: Anatomy, drop: Sequence[int]) -> None:
    """Remove whole blocks; renumber the cache layer index of the rest and fix the config."""
    n = len(anatomy.blocks)
    drop_set = set(int(i) for i in drop)
    if not drop_set <= set(range(n)):
        raise SurgeryError(f"blocks to remove must be in [0, {n}), got {sorted(drop_set)}")
    if len(drop_set) >= n:
        raise SurgeryError(f"cannot remove all {n} blocks; keep at least one")
    layers = anatomy.block_list
    kept = [layers[i] for i in range(n) if i not in drop_set]
    for new, layer in enumerate(kept):
        for m in layer.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = new
    layers_parent = anatomy.model.get_submodule(anatomy.blocks_path.rpartition(".")[0]) if "." in anatomy.blocks_path else anatomy.model
    setattr(layers_parent, anatomy.blocks_path.rpartition(".")[2], nn.ModuleList(kept))
    cfg = anatomy.config
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and len(types) == n:
        cfg.layer_types = [t for i, t in enumerate(types) if i not in drop_set]
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, key):
            setattr(cfg, key, len(kept))


# -- the config -------------------------------------------------------------------------------
_KEYS = {
    "hidden": ("hidden_size", "n_embd"),
    "heads": ("num_attention_heads", "n_head"),
    "kv": ("num_key_value_heads",),
    "ffn": ("intermediate_size", "n_inner", "ffn_dim"),
}


def layer_shapes(anatomy: Anatomy) -> list[dict]:
    """Per-block shapes read from the tensors: heads, kv_heads, head_dim, ffn, attention/mlp present."""
    out = []
    for b in anatomy.blocks:
        a, m = b.attention, b.mlp
        out.append({
            "heads": a.num_heads if a else 0,
            "kv_heads": a.num_kv_heads if a else 0,
            "head_dim": a.head_dim if a else None,
            "ffn": m.intermediate_size if m else 0,
        })
    return out


def sync_config(anatomy: Anatomy) -> bool:
    """Make `model.config` match the tensors. Returns True when vanilla transformers can rebuild the model
    from the config alone (uniform layers, head_dim derivable), False when it needs per-layer shapes."""
    cfg = anatomy.config
    shapes = layer_shapes(anatomy)
    hidden = anatomy.embed.weight.shape[1] if isinstance(anatomy.embed, nn.Embedding) else anatomy.hidden_size
    _set(cfg, "hidden", hidden)
    if hasattr(cfg, "word_embed_proj_dim"):
        cfg.word_embed_proj_dim = hidden
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, key):
            setattr(cfg, key, len(anatomy.blocks))
    head_dims = {s["head_dim"] for s in shapes if s["head_dim"]}
    uniform = (
        all(s["heads"] == shapes[0]["heads"] and s["kv_heads"] == shapes[0]["kv_heads"] and s["ffn"] == shapes[0]["ffn"]
            for s in shapes)
        and shapes[0]["heads"] > 0 and shapes[0]["ffn"] > 0
    )
    first = shapes[0]
    before = {k: getattr(cfg, k) for k in _KEYS["heads"] + _KEYS["kv"] if hasattr(cfg, k)}
    if uniform:
        _set(cfg, "heads", first["heads"])
        _set(cfg, "kv", first["kv_heads"])
        _set(cfg, "ffn", first["ffn"])
    D = head_dims.pop() if len(head_dims) == 1 else None
    native = "head_dim" in type(cfg)().to_dict()  # LLaMA-like configs honour head_dim; others derive it
    if D is not None:
        cfg.head_dim = D  # the adapters read it; harmless extra key elsewhere
    derivable = native or (D is not None and first["heads"] * D == hidden)
    if getattr(cfg, "model_type", "") == "gpt2" and first["ffn"] == 4 * hidden:
        cfg.n_inner = None
    if uniform and not _valid(cfg):  # Gemma3 refuses hidden % heads != 0 although its head_dim is explicit
        after = {k: getattr(cfg, k) for k in before}
        for k, v in before.items():
            setattr(cfg, k, v)
        if _valid(cfg):
            return False  # the config keeps the old head counts; per-layer shapes say the new ones
        for k, v in after.items():
            setattr(cfg, k, v)
    return uniform and derivable


def _valid(cfg) -> bool:
    """Whether the config passes transformers' own checks (save_pretrained runs them)."""
    try:
        getattr(cfg, "validate", lambda: None)()
    except Exception:  # noqa: BLE001 (huggingface_hub wraps the ValueError in its own error type)
        return False
    return True


def _set(cfg, what: str, value: int) -> None:
    for key in _KEYS[what]:
        if hasattr(cfg, key):
            setattr(cfg, key, value)
            return
