"""Token pruning at inference: the base config, the block-boundary context, and the plan a method returns.

A method implements ONE hook: `score(ctx) -> (B, T)` importance (prune the lowest) or, for merging,
`plan(ctx) -> Plan`. The base turns the schedule into per-row token counts, protects [CLS] / the last
position, picks the top-k, and keeps order; `engine.py` applies the plan to the real tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from ..config import Config
from .scores import attention_probs


@dataclass
class Context:
    """What a method sees at the input of block `block`, over the current T tokens of each row."""

    block: int
    x: torch.Tensor  # (B, T, H) hidden states entering the block
    q: torch.Tensor | None  # (B, h, T, D) previous block's queries (RoPE applied), if captured
    k: torch.Tensor | None  # (B, h_kv, T, D) previous block's keys
    valid: torch.Tensor  # (B, T) bool: real tokens (not padding, not filler)
    protected: torch.Tensor  # (B, T) bool: never pruned ([CLS]; for decoders first and last position)
    sizes: torch.Tensor  # (B, T) original tokens each slot stands for (merging)
    target: torch.Tensor  # (B,) long: tokens each row keeps
    causal: bool

    @property
    def key_bias(self) -> torch.Tensor:
        """(B, T): -inf on invalid slots, log(size) on the rest (proportional attention)."""
        return self.sizes.clamp(min=1).log().masked_fill(~self.valid, -1e9)  # finite: no NaN rows

    def attention(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Previous block's attention probabilities (B, h, Tq, T) for the query slots `rows` (default all)."""
        if self.q is None or self.k is None:
            raise RuntimeError("this block's queries/keys were not captured (start must be >= 1)")
        q = self.q if rows is None else self.q[:, :, rows]
        return attention_probs(q, self.k, self.key_bias, self.causal, rows)

    def attention_graph(self) -> torch.Tensor:
        """(B, T, T) previous block's attention, mean over heads, with padding queries' rows zeroed."""
        return self.attention().mean(1) * self.valid[:, :, None]

    def received(self) -> torch.Tensor:
        """(B, T) attention each token receives from the real queries (column sums of `attention_graph`)."""
        return self.attention_graph().sum(1)

    def keys(self) -> torch.Tensor:
        """(B, T, h_kv*D) keys with heads concatenated (ToMe's similarity features); hidden states if none."""
        if self.k is None:
            return self.x
        B, h, T, D = self.k.shape
        return self.k.transpose(1, 2).reshape(B, T, h * D)


@dataclass
class Plan:
    """How T current tokens become T' slots.

    keep (B, T'): current index of each new slot's representative (slots in original order);
    slot_valid (B, T'); dst (B, T): new slot each current token goes to (-1: none), used to merge
    (when `merge`) and to recover full length; merge: average tokens into their dst weighted by size.
    weights (B, T, T'), optional: many-to-many plans; row t says how token t's mass splits over the
    new slots (rows sum to 1 for tokens that go somewhere); slots are size-weighted mixtures, and
    recovery gives each token the same mixture of the slots' outputs. `dst` is then its largest share.
    """

    keep: torch.Tensor
    slot_valid: torch.Tensor
    dst: torch.Tensor
    merge: bool = False
    weights: torch.Tensor | None = None


def bisect_keep(mean_share, flops: float) -> float:
    """The smallest keep in [1e-3, 1] (to 40 halvings) whose mean token share, `mean_share(keep)` (increasing in
    keep), reaches `flops`; the caller has checked that 1e-3 does not already exceed it."""
    lo, hi = 1e-3, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_share(mid) < flops else (lo, mid)
    return hi


@dataclass
class TokenPruner(Config):
    """Base config. `keep`: share of each row's tokens that reaches the last block; blocks from `start`
    on shrink geometrically. `schedule`: share at the input of every block instead (one per block).
    `recover`: restore full length before that block (len(blocks) = after the last one), or None;
    `fill`: what a restored token holds: "copy" its stand-in's output (ToMe's unmerge), "skip" its
    own state from when it was dropped (it skipped the blocks in between, as token dropping does), or
    "delta" its own state plus the update its stand-in got since (residual unmerge; with recovery
    after the last block, mean pooling equals "copy"'s, but blocks after an earlier recovery see
    every token's own state again). `flops`: a target share of dense block FLOPs instead of `keep`;
    the geometric `keep` is solved for it when the model is known (block cost taken as linear in
    tokens, which holds within a few % for short sequences; the measured ratio is in `session.flops()`).
    """

    keep: float = 0.5
    start: int = 1
    schedule: list[float] | None = None
    recover: int | None = None
    fill: Literal["copy", "skip", "delta"] = "copy"
    flops: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = getattr(self, "name", type(self).__name__)
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"{name}: keep={self.keep} must be in (0, 1] (the share of tokens kept)")
        if self.flops is not None:
            if not 0.0 < self.flops <= 1.0:
                raise ValueError(f"{name}: flops={self.flops} must be in (0, 1] (a share of dense FLOPs)")
            if self.schedule is not None:
                raise ValueError(f"{name}: give either flops (a target) or schedule (explicit shares), not both")
        if self.start < 1:
            raise ValueError(f"{name}: start={self.start} must be >= 1 (scores come from the previous block)")
        if self.schedule is not None:
            bad = [f for f in self.schedule if not 0.0 < f <= 1.0]
            if bad:
                raise ValueError(f"{name}: schedule values {bad} must be in (0, 1]")
            until = len(self.schedule) if self.recover is None else self.recover  # full length after recovery
            if any(b > a + 1e-9 for a, b in zip(self.schedule[:until], self.schedule[1:until])):
                raise ValueError(f"{name}: schedule {self.schedule} must not increase (tokens are not re-added)")

    # -- schedule -------------------------------------------------------------------------------
    def check(self, num_blocks: int) -> None:
        """Errors that need the model: schedule length, start and recover in range."""
        name = getattr(self, "name", type(self).__name__)
        if self.schedule is not None and len(self.schedule) != num_blocks:
            raise ValueError(f"{name}: schedule has {len(self.schedule)} values, the model has {num_blocks} blocks")
        if self.schedule is None and self.keep < 1.0 and self.start >= num_blocks:
            raise ValueError(f"{name}: start={self.start} but the model has only {num_blocks} blocks (0..{num_blocks - 1})")
        if self.recover is not None and not 1 <= self.recover <= num_blocks:
            raise ValueError(f"{name}: recover={self.recover} must be a block index in 1..{num_blocks} "
                             f"({num_blocks} = after the last block)")
        if self.flops is not None:
            self.keep = self.solve_keep(self.flops, num_blocks)

    def solve_keep(self, flops: float, num_blocks: int) -> float:
        """The geometric `keep` whose token shares average `flops` over the blocks (bisection)."""
        name = getattr(self, "name", type(self).__name__)
        end = num_blocks if self.recover is None else self.recover

        def mean_share(keep: float) -> float:
            shares = [1.0 if i < self.start or i >= end else keep ** ((i - self.start + 1) / (num_blocks - self.start))
                      for i in range(num_blocks)]
            return sum(shares) / num_blocks

        if flops >= 1.0:
            return 1.0
        if self.start >= min(end, num_blocks) or mean_share(1e-3) > flops:
            raise ValueError(f"{name}: flops={flops} is out of reach with start={self.start}, recover={self.recover} "
                             f"on {num_blocks} blocks (at least {mean_share(1e-3):.2f}); start earlier")
        return bisect_keep(mean_share, flops)

    def fraction(self, block: int, num_blocks: int) -> float:
        """Share of the original tokens at the input of `block`."""
        if self.schedule is not None:
            return self.schedule[block]
        if block < self.start or self.keep >= 1.0:
            return 1.0
        return self.keep ** ((block - self.start + 1) / (num_blocks - self.start))

    def targets(self, block: int, num_blocks: int, n: torch.Tensor) -> torch.Tensor:
        """Tokens kept per row at the input of `block`, from the rows' real lengths n (B,)."""
        f = self.fraction(block, num_blocks)
        return torch.ceil(n.double() * f - 1e-6).long()

    def reduces(self, num_blocks: int) -> bool:
        return any(self.fraction(i, num_blocks) < 1.0 for i in range(num_blocks))

    # -- the one hook -----------------------------------------------------------------------------
    needs_attention: ClassVar[bool] = False  # scores use attention maps (no QK-norm models yet)
    encoder_only: ClassVar[bool] = False
    decoder_only: ClassVar[bool] = False

    def score(self, ctx: Context) -> torch.Tensor:
        """(B, T) importance; the lowest are pruned. Subclasses implement this or `plan`."""
        raise NotImplementedError

    def plan(self, ctx: Context, recover: bool) -> Plan:
        s = self.score(ctx).float()
        return topk_plan(s, ctx, recover)


def topk_plan(score: torch.Tensor, ctx: Context, recover: bool) -> Plan:
    """Keep each row's `target` highest-scoring valid tokens (protected ones first), in original order."""
    B, T = score.shape
    s = score.masked_fill(~ctx.valid, float("-inf")).masked_fill(ctx.protected, float("inf"))
    order = s.argsort(dim=1, descending=True, stable=True)  # (B, T)
    rank = order.argsort(dim=1)  # (B, T) 0 = best
    kept = (rank < ctx.target[:, None]) & ctx.valid
    keep, slot_valid, slot_of = compact(kept, ctx.causal)
    dst = slot_of
    if recover:  # a pruned token takes the output of its most similar kept token (by keys)
        dst = torch.where(kept, slot_of, nearest(ctx.keys(), keep, slot_valid))
    return Plan(keep, slot_valid, dst.masked_fill(~ctx.valid, -1))


def compact(kept: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slots for the kept tokens of each row, in original order: keep (B, T'), slot_valid (B, T'),
    slot_of (B, T) (-1 where not kept). Rows keeping fewer get filler slots: last, or first for
    decoders so the last position stays last."""
    B, T = kept.shape
    pos = torch.arange(T, device=kept.device).expand(B, T)
    filler_key = -1 if causal else T
    n = kept.sum(1)
    Tn = int(n.max())
    keep = torch.where(kept, pos, filler_key).sort(dim=1, descending=causal).values[:, :Tn]  # (B, T')
    if causal:
        keep = keep.flip(1)
    slot_valid = keep != filler_key
    first_kept = torch.where(kept, pos, T).min(1).values.clamp(max=T - 1)  # fillers copy a real token
    keep = torch.where(slot_valid, keep, first_kept[:, None])
    slots = torch.arange(Tn, device=kept.device).expand(B, Tn)
    slot_of = torch.full((B, T + 1), -1, dtype=torch.long, device=kept.device)
    slot_of = slot_of.scatter(1, torch.where(slot_valid, keep, T), torch.where(slot_valid, slots, -1))[:, :T]
    return keep, slot_valid, slot_of


def nearest(feat: torch.Tensor, keep: torch.Tensor, slot_valid: torch.Tensor) -> torch.Tensor:
    """(B, T): for every token, the slot of the kept token with the most similar features (cosine)."""
    f = F.normalize(feat.float(), dim=-1)  # (B, T, C)
    fk = f.gather(1, keep[..., None].expand(-1, -1, f.shape[-1]))  # (B, T', C)
    sim = (f @ fk.transpose(1, 2)).masked_fill(~slot_valid[:, None, :], float("-inf"))  # (B, T, T')
    return sim.argmax(-1)

