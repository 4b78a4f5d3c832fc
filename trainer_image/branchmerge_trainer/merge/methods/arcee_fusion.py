"""Arcee Fusion as mergekit's released code computes it (the code that produced
TinyR1-32B-Preview), with exact quantiles instead of a random sample.

Per tensor, with L the base (kept) and R the other model, all in the working dtype:

    S   = |R - L| * sum_j p_j log(p_j / q_j)    p = softmax(R, -1) + 1e-8, q = softmax(L, -1) + 1e-8
    thr = median + 1.5 * (q3 - q1)               quantiles of S at floor(q * (n - 1))
    out = L + (S >= thr) * (R - L)               added in float32, then rounded to the output dtype

The working-dtype rounding is reproduced op for op, so on every tensor of at most 1e6
elements the output equals mergekit's bit for bit (as values: a base element of -0.0 may
stay -0.0 where mergekit writes +0.0). What that implies: with bfloat16 math ``R - L`` is
rounded before it is added back, so a fused element can differ from R by an ulp, as in
mergekit; with ``dtype: float32`` on bf16 checkpoints every element is exactly L's or R's.

Above 1e6 elements mergekit estimates the quantiles from a random sample of 1e6 scores
(``randperm``/``randint``: unseeded, different on every run) because it sorts them. Here the
order statistics come from an exact radix selection over all scores, which costs about what
drawing a sample would and is deterministic without any seed; the fused fraction matches
mergekit's within its sampling noise. Rows are processed in chunks, which changes no
rounding (every op is row-wise) but bounds scratch memory and keeps the passes in cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

from ._common import as_rows, row_chunks
from ._select import order_statistics
from .spec import MergeCall, MethodSpec

#: Above this many elements mergekit samples its quantiles (we compute them exactly).
SAMPLE_SIZE = 1_000_000
EPS = 1e-8


def row_kl(other: Tensor, base: Tensor) -> Tensor:
    """KL(softmax(other) + eps || softmax(base) + eps) per row, in the input dtype.
    ``other`` and ``base`` are 2-D; returns [rows, 1]."""
    p = torch.softmax(other, dim=-1) + EPS
    q = torch.softmax(base, dim=-1) + EPS
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def fusion_threshold(chunks: Callable[[], Iterable[Tensor]], n: int) -> Tensor:
    """Tukey's upper fence of the ``n`` scores yielded by ``chunks()``, from the order
    statistics at floor(q * (n - 1)) and rounded in the scores' dtype step by step like
    mergekit's ``median + 1.5 * (q3 - q1)``."""
    ranks = [(num * (n - 1)) // den for num, den in ((1, 4), (1, 2), (3, 4))]  # exact floor(q * (n - 1))
    q1, med, q3 = order_statistics(chunks, ranks)
    return med + 1.5 * (q3 - q1)


def arcee_fusion(
    base: Tensor,
    other: Tensor,
    *,
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
    spans = list(row_chunks(rows, cols))
    kl = torch.empty((rows, 1), dtype=base.dtype, device=base.device)
    ready = False

    def scores() -> Iterator[Tensor]:
        nonlocal ready
        for s in spans:
            if not ready:
                kl[s] = row_kl(R[s], L[s])
            yield (R[s] - L[s]).abs() * kl[s]
        ready = True

    threshold = fusion_threshold(scores, base.numel()).to(base.device)
    out = torch.empty(L.shape, dtype=out_dtype, device=base.device)
    fused = 0
    for s in spans:
        diff = R[s] - L[s]
        mask = (diff.abs() * kl[s]) >= threshold
        # mergekit: base + (other - base) * mask.float(), i.e. float32 math, then out_dtype.
        # Explicit casts: mixed bf16 x float32 ops take a slow, unvectorised path in torch.
        out[s] = (L[s].float() + diff.float() * mask.float()).to(out_dtype)
        if stats is not None:
            fused += int(mask.sum())
    if stats is not None:
        stats["fused"] = stats.get("fused", 0) + fused
    return out.reshape(base.shape)


def _run(call: MergeCall) -> Tensor:
    assert call.base is not None
    other = call.others()[0]
    return arcee_fusion(
        call.tensors[call.base], call.tensors[other], out_dtype=call.out_dtype, stats=call.stats
    )


SPEC = MethodSpec(
    name="arcee_fusion",
    base="required",
    min_inputs=2,
    max_inputs=2,
    run=_run,
    doc="Keep the base; take the other model's element where its importance passes Tukey's fence.",
)
