"""SparseGPT: prune, then move the remaining weights to compensate (OBS updates; Frantar & Alistarh 2023,
arXiv:2301.00774).

percdamp: damping added to the Hessian diagonal, as a share of its mean.
blocksize: columns per lazy update (and per unstructured mask choice).
true_sequential: solve q/k/v, then o, gate/up, down, each on inputs that already went through the
pruned parts before it (weights/sequential.py); False collects every Hessian from the dense block.
asymmetric: fit each layer to the *dense* model's output W X_dense rather than to W X on its own (already
pruned) inputs, so the error of earlier blocks is corrected instead of carried (the asymmetric calibration of
GPTAQ, Li et al. 2025, here for pruning). With C = X_dense^T X and H = X^T X the unpruned optimum, damped toward
W, is W + W (C - H)(H + damp)^-1; SparseGPT then prunes that, with one factorisation of H + damp for the refit
and the inverse. Costs one dense block forward per block and W (C - H), summed directly as ((X_dense - X) W^T)^T X
where the layer has fewer outputs than inputs (weights/sequential.py; P1 on smollm2-135m: 1.6x the plain run's time, kl_doc 0.31 instead of 0.44 at 50 % with the full refit).
Default (None): on whenever true_sequential is; asymmetric=False is the paper's SparseGPT.
refit: the refit's strength, W + refit * W (C - H)(H + damp)^-1 (1 = the full least-squares refit, 0 = none).
Default 0.5, chosen on SciQ's passages (text no evaluation reads): on smollm2-135m at 50 % the full refit fits the
calibration text (doc KL 0.31 vs llm-compressor's 0.44) but is *worse* out of domain (SciQ 1.28 vs 1.13, task
contexts 1.21 vs 1.06); half of it is better than both everywhere (SciQ 1.05, tasks 0.97, code 0.42, doc 0.27).
refit_damp: the refit's own damping (share of the mean Hessian diagonal; None: percdamp). More damping pulls the
refit toward W, a ridge against fitting the calibration text too closely (one more factorisation per group).
refit_layers: 'all' refits every projection; 'outputs' only o_proj and down_proj, whose outputs join the residual
stream (q/k/v and gate/up then get the paper's SparseGPT on their already-pruned inputs).
refit_min_tokens: refit a layer only where the calibration holds at least this many tokens per input column; with
fewer, C - H is estimated from too few samples and the refit fits the calibration text: measured out of domain, the
refit at 0.5 beats the plain SparseGPT on smollm2-135m at 64 windows (32,768 tokens: 21 per down_proj column; SciQ
KL 1.05 vs 1.11) but loses at 4 windows (1.3 per column; SciQ 1.60 vs 1.44, task contexts 1.45 vs 1.29), and on
qwen2.5-coder-1.5b at 32 windows (1.8 per down_proj column, 11 for the rest) it lost 7.4 +- 2.6 points of task
accuracy to llm-compressor where the plain run is level with it (-1.1 +- 1.8; task-context KL 0.757 vs 1.044 with
the refit). 16 keeps the refit where it was measured to help; when no layer qualifies the dense stream is not run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import calibrate
from ..calibrate import BlockCalib, LayerStats
from ..models import Proj
from . import WEIGHTS
from .base import WeightPruner
from .obs import damped_cholesky, inverse_cholesky, obs_prune, solve_damped_
from .sequential import input_groups, stack_rows, stages


@WEIGHTS.register("sparsegpt")
@dataclass
class SparseGPT(WeightPruner):
    percdamp: float = 0.01
    blocksize: int = 128
    true_sequential: bool = True
    asymmetric: bool | None = None  # None: = true_sequential
    refit: float = 0.5  # chosen on held-out text (benchmarks/sparsegpt_generalise.py), not on evaluation windows
    refit_damp: float | None = None  # None: = percdamp
    refit_min_tokens: float = 16.0  # calibration tokens per input column below which a layer is not refitted
    refit_layers: str = "all"  # all | outputs: only o and down, whose outputs join the residual stream

    needs_hessian = True

    @property
    def dense_targets(self) -> bool:
        return self.asymmetric and self.refit > 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.percdamp <= 1.0:
            raise ValueError(f"percdamp must be in [0, 1] (a share of the mean Hessian diagonal), got {self.percdamp!r}")
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise ValueError(f"blocksize must be a positive number of columns, got {self.blocksize!r}")
        if self.nm is not None and self.blocksize % self.nm[1]:
            raise ValueError(f"blocksize {self.blocksize} must be a multiple of M={self.nm[1]} for pattern {self.pattern!r}")
        if not 0.0 <= self.refit <= 1.0:
            raise ValueError(f"refit is the refit's strength in [0, 1] (1: full refit, 0: none), got {self.refit!r}")
        if self.refit_damp is not None and not 0.0 < self.refit_damp <= 100.0:
            raise ValueError(f"refit_damp must be in (0, 100] (a share of the mean Hessian diagonal) or None "
                             f"(= percdamp), got {self.refit_damp!r}")
        if not 0.0 <= self.refit_min_tokens < float("inf"):
            raise ValueError(f"refit_min_tokens is a number of calibration tokens per input column >= 0 (0: always "
                             f"refit), got {self.refit_min_tokens!r}")
        if self.refit_layers not in ("all", "outputs"):
            raise ValueError(f"refit_layers is 'all' or 'outputs' (only o_proj and down_proj), got {self.refit_layers!r}")
        if self.asymmetric is None:
            self.asymmetric = bool(self.true_sequential)
        if self.asymmetric and not self.true_sequential:
            raise ValueError("asymmetric needs true_sequential=True: refitting o/down to the dense outputs from inputs "
                             "measured before q/k/v were pruned diverges (P1 50 %: kl 2.08 instead of 0.31)")
        if self.block is not None and self.blocksize % self.block[1]:
            raise ValueError(f"blocksize {self.blocksize} must be a multiple of the block width {self.block[1]}")

    def score(self, W: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        raise NotImplementedError("SparseGPT chooses its mask while it updates the weights (obs_prune)")

    @torch.no_grad()
    def prune_block(self, bc: BlockCalib, projs: dict[str, Proj]) -> None:
        # too few tokens per input column: the plain SparseGPT for that layer, whose dense statistics are not summed
        fit = None if bc.tokens is None else {n for n, p in projs.items() if self.refits(bc.tokens, p.weight.shape[1])}
        if self.refit_layers == "outputs":  # the projections that close a sublayer (o, down)
            ends = {id(p.module) for members, sub in stages(bc.block) if sub is not None for p in members}
            fit = {n for n in (projs if fit is None else fit) if id(projs[n].module) in ends}
        for g in input_groups(bc, projs, sequential=self.true_sequential, dense=fit):
            stats = g.take()
            if not self.refits(g.n, stats[0].shape[0]):  # (the token count unknown above)
                stats[1] = stats[2] = None
            self.solve([projs[name] for name in g.names], stats)

    def refits(self, tokens: int, columns: int) -> bool:
        """Whether a layer of `columns` inputs is refitted on `tokens` calibration tokens (`refit_min_tokens`)."""
        return self.dense_targets and tokens >= self.refit_min_tokens * columns

    def dense_stream(self, anatomy, calibration: torch.Tensor) -> bool:
        """Run the dense stream only if some projection would be refitted with this calibration."""
        if not self.dense_targets:
            return False
        # token windows count themselves; images need one forward to block 0 (patches + [CLS])
        per = calibrate.tokens_per_input(anatomy, calibration) if calibrate.is_images(calibration) else calibration.shape[1]
        tokens = per * calibration.shape[0]
        return any(self.refits(tokens, p.in_features) for _, p in anatomy.projections())

    @torch.no_grad()
    def solve(self, projs: list[Proj], stats: list[torch.Tensor | None]) -> None:
        """Prune projections that share one input together; write the updated weights back.

        stats: [H, C, R] (InputGroup.take), handed over: each is dropped as soon as it is used. With C = X_dense^T X
        or R = W (C - H) given, the weights are first refitted to the dense outputs (`asymmetric`), solved with the
        same factorisation of H as the inverse. An 8B model's FFN input (14336 wide) needs at most two (in, in)
        matrices at a time: H and its factor; the stacked weight is made only once H is freed."""
        H, C, R = stats
        stats.clear()
        W = None
        if C is not None:  # more outputs than inputs: C is the smaller statistic
            W, spans = stack_rows(projs)  # (sum of outs, in)
            R = W @ C.sub_(H)  # W (C - H): (out, in)
            del C
        if R is not None and self.refit_damp not in (None, self.percdamp):  # the refit's own factorisation
            L, _ = damped_cholesky(H, self.refit_damp, what=projs[0].name)
            solve_damped_(R, L)  # R <- R (H + refit_damp)^-1
            del L
            U = inverse_cholesky(H, self.percdamp, what=projs[0].name)
        else:
            U = inverse_cholesky(H, self.percdamp, what=projs[0].name, refit=R)  # R <- R (H + damp)^-1
        del H
        if W is None:
            W, spans = stack_rows(projs)
        if R is not None:
            W.add_(R, alpha=self.refit)  # the refit: W + refit * W (C - H)(H + damp)^-1
            del R
        segments = [(r0, r1, self.layer_sparsity(p.name)) for p, (r0, r1) in zip(projs, spans)]
        W = obs_prune(W, U, sparsity=segments, nm=self.nm, block=self.block, blocksize=self.blocksize)
        for p, (r0, r1) in zip(projs, spans):
            p.weight.copy_(W[r0:r1].to(p.weight.dtype))


def refit_to_dense(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, percdamp: float) -> torch.Tensor:
    """argmin_V ||W X_dense^T - V X^T||^2 + damp ||V - W||^2 = W + W (C - H)(H + damp I)^-1, for W (out, in)."""
    L, _ = damped_cholesky(H, percdamp, what="refit")
    return W + solve_damped_(W @ (C - H), L)
