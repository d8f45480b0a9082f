"""A KV cache that stores only what a press keeps: per-head lengths, packed without padding.

Layout of one layer (B rows, H KV heads):
    keys    (N, Dk)  every kept key, row-major by (row, head, position); N = lengths.sum()
    values  (N, Dv)
    lengths (B, H)   tokens kept by each row's head
    channels (B, H, Dk) | None   key channels kept (ThinK); None = all D channels
When every head keeps the same number of tokens, `keys.view(B, H, L, Dk)` is the dense cache (no copy).
For attention the layer is materialised as (B, H, L_max, D) with zeros where a head holds fewer tokens
(or dropped channels); the press hooks give SDPA a mask that hides those slots. The materialised tensor
lives only during a forward; between forwards only the packed tensors are held.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def pack(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) and a (B, H, L) mask -> (N, D), row-major by (row, head, position)."""
    return x[keep]


def unpack(flat: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, D) packed by `lengths` (B, H) -> (B, H, L_max, D) and the (B, H, L_max) valid mask (None if uniform)."""
    B, H = lengths.shape
    L = int(lengths.max()) if lengths.numel() else 0
    if bool((lengths == L).all()):
        return flat.view(B, H, L, flat.shape[-1]), None
    valid = torch.arange(L, device=flat.device) < lengths[..., None]  # (B, H, L)
    out = flat.new_zeros(B, H, L, flat.shape[-1])
    out[valid] = flat
    return out, valid


class PressLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.lengths: torch.Tensor | None = None  # (B, H)
        self.channels: torch.Tensor | None = None  # (B, H, Dk)
        self.state: dict[str, torch.Tensor] = {}  # per-token press state, packed like keys: name -> (N,)
        self.seen = 0  # tokens seen (logical length: positions continue from here)
        self.head_dim = 0
        self.pending: dict | None = None  # the merged old + new tensors of the current forward

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.device = key_states.device
        self.head_dim = D
        self.keys = key_states.new_zeros(0, D)
        self.values = value_states.new_zeros(0, value_states.shape[-1])
        self.lengths = torch.zeros(B, H, dtype=torch.long, device=self.device)
        self.is_initialized = True

    # -- reading -------------------------------------------------------------------------------------
    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Materialise (B, H, L_max, D) keys (dropped channels as zeros), values, and the valid mask."""
        K, valid = unpack(self.keys, self.lengths)
        V, _ = unpack(self.values, self.lengths)
        if self.channels is not None:
            full = K.new_zeros(*K.shape[:-1], self.head_dim)  # (B, H, L, D)
            idx = self.channels[:, :, None, :].expand(-1, -1, K.shape[2], -1)  # (B, H, L, Dk)
            K = full.scatter_(-1, idx, K)
        return K, V, valid

    def stored_length(self) -> int:
        return int(self.lengths.max()) if self.is_initialized and self.lengths.numel() else 0

    def uniform(self) -> bool:
        return not self.is_initialized or bool((self.lengths == self.lengths.flatten()[0]).all())

    # -- the transformers Cache protocol -------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Return old (materialised) + new keys/values for attention; `commit` packs them after it."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, H, q, _ = key_states.shape
        K, V, valid = self.dense()
        old = K.shape[2]
        K = torch.cat([K, key_states], dim=2)  # (B, H, L_old + q, D)
        V = torch.cat([V, value_states], dim=2)
        state = {}
        for name, flat in self.state.items():
            s, _ = unpack(flat[:, None], self.lengths)
            state[name] = torch.cat([s[..., 0], s.new_zeros(B, H, q)], dim=2)  # (B, H, L_old + q)
        self.pending = {"keys": K, "values": V, "old_valid": valid, "old": old, "new": q, "state": state}
        self.seen += q
        return K, V

    def commit(self, keep: torch.Tensor | None, valid: torch.Tensor, channels: torch.Tensor | None = None,
               state: dict[str, torch.Tensor] | None = None) -> None:
        """Store the pending tokens where `keep & valid` ((B, H, L) masks); `keep=None` keeps every valid one."""
        p, self.pending = self.pending, None
        K, V = p["keys"], p["values"]
        mask = valid if keep is None else keep & valid
        if channels is not None:
            self.channels = channels
        if self.channels is not None:
            idx = self.channels[:, :, None, :].expand(-1, -1, K.shape[2], -1)  # (B, H, L, Dk)
            K = K.gather(-1, idx)
        self.lengths = mask.sum(-1)
        if bool(mask.all()):  # dense and complete: the packed store is a view, no copy
            self.keys = K.reshape(-1, K.shape[-1])
            self.values = V.reshape(-1, V.shape[-1])
        else:
            self.keys, self.values = pack(K, mask), pack(V, mask)
        self.state = {n: pack(s, mask) for n, s in (state if state is not None else p["state"]).items()}

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Sizes of the model's own mask (built over logical positions); the press hooks replace it.
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported with a pressed KV cache; use greedy or sampling")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("num_return_sequences > 1 is not supported with a pressed KV cache")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("batch selection is not supported with a pressed KV cache")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a pressed KV cache cannot be cropped (assisted decoding is not supported)")

    @property
    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class PressCache(Cache):
    """One `PressLayer` per attention block. Built by `trimformer.kv.press`; pass a compressed one to
    `generate(cache=...)` to ask questions about a context compressed once (copy it per question)."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[PressLayer() for _ in range(num_layers)])
        self.new_valid: torch.Tensor | None = None  # (B, q) which tokens of the current forward are real
        self.forwards = 0

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values physically held (indices and lengths not included: see `overhead_bytes`)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def overhead_bytes(self) -> int:
        total = 0
        for layer in self.layers:
            for t in (layer.lengths, layer.channels, *layer.state.values()):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    def kept_tokens(self) -> torch.Tensor:
        """(layers, B, H) tokens held per layer, row and head."""
        return torch.stack([layer.lengths for layer in self.layers])

    def copy(self) -> PressCache:
        """An independent copy (the packed tensors are cloned)."""
        return copy.deepcopy(self)
