"""Task-vector merges (TIES, DARE) as one chunked pipeline, in mergekit's order of operations:
sparsify each task vector (x_i - base) -> optional L1 rescale -> multiply by its weight ->
optional sign consensus -> sum -> optional normalisation -> lambda -> add to the base.

Each pass streams over chunks and recomputes the deltas rather than keeping them, so the
scratch memory is a few chunks regardless of tensor size. Arithmetic is float32 (float64 for
float64 inputs); the result is rounded once to the output dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor

from ._common import TopKMask, compute_dtype, flat_chunks, seed_key, uniform_below
from .spec import ParamSpec

Sparsify = Literal["magnitude", "random"] | None
#: mergekit's threshold below which a norm is treated as zero (no rescaling).
RESCALE_EPS = 1e-7


def combine(
    base: Tensor,
    others: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    sparsify: Sparsify,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lambda_: float = 1.0,
    key: int = 0,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """The generalized task-arithmetic merge; see the module docstring."""
    out_dtype = out_dtype or base.dtype
    dtype = compute_dtype(base)
    numel = base.numel()
    b_flat = base.reshape(-1)
    flats = [t.reshape(-1) for t in others]
    spans = list(flat_chunks(numel))

    def delta(i: int, s: slice) -> Tensor:
        return flats[i][s].to(dtype) - b_flat[s].to(dtype)

    Mask = Callable[[int, slice, Tensor], Tensor]
    masks: list[Mask | None] = []
    topks: list[TopKMask | None] = []
    for i, density in enumerate(densities):
        topk: TopKMask | None = None
        mask: Mask | None = None
        if sparsify is None or density >= 1:
            pass
        elif density <= 0:
            mask = lambda i, s, d: torch.zeros_like(d)  # noqa: E731
        elif sparsify == "magnitude":
            k = max(1, int(density * numel))

            def magnitudes(i: int = i) -> Iterator[Tensor]:
                return (delta(i, s).abs_() for s in spans)

            topk = TopKMask(magnitudes, numel, k)
            mask = lambda i, s, d, topk=topk: topk(d.abs())  # noqa: E731  (float 0/1)
        else:
            stream = seed_key(key, "dare", i)
            mask = lambda i, s, d, stream=stream, p=density: uniform_below(stream, s, p, d.device).to(d.dtype)  # noqa: E731
        masks.append(mask)
        topks.append(topk)

    scales = [1.0] * len(others)
    if rescale:
        for i, mask in enumerate(masks):
            if mask is None:
                continue
            before = after = 0.0
            for s in spans:
                d = delta(i, s)
                before += float(d.abs().sum(dtype=torch.float64))
                after += float((d.abs() * mask(i, s, d)).sum(dtype=torch.float64))
            if before >= RESCALE_EPS and after >= RESCALE_EPS:
                scales[i] = before / after
            topk = topks[i]
            if topk is not None:
                topk.reset()

    out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    out_flat = out.reshape(-1)
    weight_sum = float(sum(weights))
    # In-place accumulation with explicit casts: torch.stack/where/mixed-dtype ops cost
    # several times more per element on CPU than add_/addcmul_ on one dtype.
    for s in spans:
        b = b_flat[s].to(dtype)
        ds = []
        for i, mask in enumerate(masks):
            d = flats[i][s].to(dtype) - b
            if mask is not None:
                d.mul_(mask(i, s, d))
            ds.append(d.mul_(scales[i] * weights[i]))
        mixed = torch.zeros_like(b)
        if consensus:
            total = ds[0].clone()
            for d in ds[1:]:
                total.add_(d)
            elected = (total >= 0).to(dtype).mul_(2).sub_(1)  # +1 / -1; a zero sum counts as +1
            divisor = torch.zeros_like(b) if normalize else None
            for d, w in zip(ds, weights, strict=True):
                agree = (d * elected).clamp_(min=0).sign_()  # 1 where sign(d) == elected, else 0
                mixed.addcmul_(d, agree)
                if divisor is not None:
                    divisor.add_(agree, alpha=w)
            if divisor is not None:
                mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
        else:
            for d in ds:
                mixed.add_(d)
            if normalize and abs(weight_sum) >= 1e-8:
                mixed.div_(weight_sum)
        out_flat[s] = b.add_(mixed, alpha=lambda_)
    return out


def task_vector_params(normalize: bool, rescale: bool) -> tuple[ParamSpec, ...]:
    """The parameters every task-vector method shares (mergekit's names and defaults)."""
    return (
        ParamSpec("weight", "non_base", 1.0, doc="Weight of the model's task vector."),
        ParamSpec("density", "non_base", 1.0, low=0.0, high=1.0, doc="Fraction of the task vector kept."),
        ParamSpec("lambda", "shared", 1.0, doc="Scale of the merged task vector."),
        ParamSpec(
            "normalize", "shared", float(normalize), kind="bool", doc="Divide by the (agreeing) weights."
        ),
        ParamSpec(
            "rescale", "shared", float(rescale), kind="bool", doc="Restore each sparsified vector's L1 norm."
        ),
        ParamSpec("int8_mask", "shared", 0.0, kind="bool", doc="Accepted for mergekit configs; no effect."),
    )
