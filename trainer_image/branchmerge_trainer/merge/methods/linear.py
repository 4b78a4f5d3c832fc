"""Linear merge (model soup): sum_i w_i x_i / sum_i w_i, accumulated in float32."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._common import compute_dtype, flat_chunks
from .spec import MergeCall, MethodSpec, ParamSpec


def linear(
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = True,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Weighted average (``normalize``) or weighted sum of same-shaped tensors."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError("linear: need one weight per tensor and at least one tensor")
    first = tensors[0]
    out_dtype = out_dtype or first.dtype
    dtype = compute_dtype(first)
    total = float(sum(weights))
    if normalize and total == 0:
        raise ValueError("linear: the weights sum to 0, so they cannot be normalized")
    scale = 1.0 / total if normalize else 1.0
    flats = [t.reshape(-1) for t in tensors]
    out = torch.empty(first.shape, dtype=out_dtype, device=first.device)
    out_flat = out.reshape(-1)
    for s in flat_chunks(first.numel()):
        acc = torch.zeros(s.stop - s.start, dtype=dtype, device=first.device)
        for x, w in zip(flats, weights, strict=True):
            acc.add_(x[s].to(dtype), alpha=w)
        if scale != 1.0:
            acc.mul_(scale)
        out_flat[s] = acc
    return out


def _run(call: MergeCall) -> Tensor:
    weights = [p["weight"] for p in call.params]
    return linear(call.tensors, weights, normalize=bool(call.shared["normalize"]), out_dtype=call.out_dtype)


SPEC = MethodSpec(
    name="linear",
    base="optional",
    min_inputs=1,
    max_inputs=None,
    run=_run,
    params=(
        ParamSpec("weight", "input", 1.0, doc="Relative weight of the model."),
        ParamSpec("normalize", "shared", 1.0, kind="bool", doc="Divide by the sum of weights."),
    ),
    doc="Weighted average of the models (a model soup).",
)
