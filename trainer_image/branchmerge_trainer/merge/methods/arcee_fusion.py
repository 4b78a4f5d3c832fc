"""Arcee Fusion exactly as mergekit's released code computes it (the code that produced
TinyR1-32B-Preview), except for how the quantile sample is drawn.

Per tensor, with L the base (kept) and R the other model, all in the working dtype:

    S   = |R - L| * sum_j p_j log(p_j / q_j)    p = softmax(R, -1) + 1e-8, q = softmax(L, -1) + 1e-8
    thr = median + 1.5 * (q3 - q1)               of S, or of a 1e6-element sample of S
    out = L + (S >= thr) * (R - L)

Quantiles are the order statistics at ``floor(q * (n - 1))``. The working-dtype rounding is
reproduced op for op, so for tensors of at most 1e6 elements the output equals mergekit's
bit for bit. Note what that implies: with bfloat16 math, ``R - L`` is rounded before it is
added back, so a fused element can differ from R by one ulp, exactly as in mergekit; with
``dtype: float32`` on bf16 checkpoints every element is exactly L's or R's.

Differences from mergekit, on purpose: above 1e6 elements the sample comes from a seeded
counter-based RNG (reproducible, same on CPU and CUDA, no index tensor the size of the
weight); order statistics use selection instead of a full sort; rows are processed in
chunks, which leaves every rounding unchanged (all ops are row-wise) but bounds scratch
memory and keeps the passes in cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import as_rows, row_chunks, sample_indices, seed_key
from ._select import order_statistics
from .spec import MergeCall, MethodSpec

#: mergekit's sample size for the quantiles.
SAMPLE_SIZE = 1_000_000
EPS = 1e-8


def row_kl(other: Tensor, base: Tensor) -> Tensor:
    """KL(softmax(other) + eps || softmax(base) + eps) per row, in the input dtype.
    ``other`` and ``base`` are 2-D; returns [rows, 1]."""
    p = torch.softmax(other, dim=-1) + EPS
    q = torch.softmax(base, dim=-1) + EPS
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def quantile_stats(flat_scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q1, median, q3 at floor(q * (n - 1)) of the sorted values (0-d tensors)."""
    n = flat_scores.numel()
    ranks = [(num * (n - 1)) // den for num, den in ((1, 4), (1, 2), (3, 4))]  # exact floor(q * (n - 1))
    q1, med, q3 = order_statistics(lambda: [flat_scores], ranks)
    return q1.to(flat_scores.device), med.to(flat_scores.device), q3.to(flat_scores.device)


def fusion_threshold(flat_scores: Tensor) -> Tensor:
    """Tukey's upper fence, rounded in the scores' dtype step by step like mergekit."""
    q1, med, q3 = quantile_stats(flat_scores)
    return med + 1.5 * (q3 - q1)


def arcee_fusion(
    base: Tensor,
    other: Tensor,
    *,
    key: int = 0,
    out_dtype: torch.dtype | None = None,
    stats: dict[str, float] | None = None,
) -> Tensor:
    """Fuse ``other`` into ``base`` (same shape and dtype); see the module docstring.
    Returns the fused tensor in ``out_dtype`` (default: the inputs' dtype); adds the number
    of elements selected from ``other`` to ``stats["fused"]`` when given."""
    if base.shape != other.shape or base.dtype != other.dtype:
        raise ValueError(
            f"arcee_fusion: inputs differ ({base.shape}/{base.dtype} vs {other.shape}/{other.dtype})"
        )
    out_dtype = out_dtype or base.dtype
    if base.numel() == 0:
        return base.to(out_dtype, copy=True)
    L, R = as_rows(base), as_rows(other)
    rows, cols = L.shape
    kl = torch.empty((rows, 1), dtype=base.dtype, device=base.device)
    for s in row_chunks(rows, cols):
        kl[s] = row_kl(R[s], L[s])
    numel = base.numel()
    if numel > SAMPLE_SIZE:
        idx = sample_indices(seed_key(key, "arcee_fusion.sample"), SAMPLE_SIZE, numel, base.device)
        r_flat, l_flat = R.reshape(-1), L.reshape(-1)
        sample = (r_flat[idx] - l_flat[idx]).abs() * kl.reshape(-1)[idx // cols]
        threshold = fusion_threshold(sample)
        del idx, sample
    else:
        threshold = fusion_threshold(((R - L).abs() * kl).reshape(-1))
    out = torch.empty(L.shape, dtype=out_dtype, device=base.device)
    fused = 0
    for s in row_chunks(rows, cols):
        diff = R[s] - L[s]
        mask = (diff.abs() * kl[s]) >= threshold
        # mergekit: base + (other - base) * mask.float() -> float32 math, then out_dtype.
        out[s] = (L[s] + diff * mask.to(torch.float32)).to(out_dtype)
        if stats is not None:
            fused += int(mask.sum())
    if stats is not None:
        stats["fused"] = stats.get("fused", 0) + fused
    return out.reshape(base.shape)


def _run(call: MergeCall) -> Tensor:
    assert call.base is not None
    other = call.others()[0]
    return arcee_fusion(
        call.tensors[call.base], call.tensors[other], key=call.key, out_dtype=call.out_dtype, stats=call.stats
    )


SPEC = MethodSpec(
    name="arcee_fusion",
    base="required",
    min_inputs=2,
    max_inputs=2,
    run=_run,
    doc="Keep the base; take the other model's element where its importance passes Tukey's fence.",
)
