"""Task arithmetic: base + lambda * sum_i w_i (x_i - base), optionally divided by sum_i w_i."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._common import compute_dtype, flat_chunks
from .spec import MergeCall, MethodSpec, ParamSpec


def task_arithmetic(
    base: Tensor,
    others: Sequence[Tensor],
    weights: Sequence[float],
    *,
    lambda_: float = 1.0,
    normalize: bool = False,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """Add the weighted task vectors of ``others`` to ``base`` (float32 math)."""
    out_dtype = out_dtype or base.dtype
    dtype = compute_dtype(base)
    total = float(sum(weights))
    divisor = 1.0 if (not normalize or abs(total) < 1e-8) else total
    b_flat = base.reshape(-1)
    flats = [t.reshape(-1) for t in others]
    out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    out_flat = out.reshape(-1)
    for s in flat_chunks(base.numel()):
        b = b_flat[s].to(dtype)
        mixed = torch.zeros_like(b)
        for x, w in zip(flats, weights, strict=True):
            mixed.add_(x[s].to(dtype) - b, alpha=w)
        out_flat[s] = b + mixed * (lambda_ / divisor)
    return out


def _run(call: MergeCall) -> Tensor:
    assert call.base is not None
    idx = call.others()
    return task_arithmetic(
        call.tensors[call.base],
        [call.tensors[i] for i in idx],
        [call.params[i]["weight"] for i in idx],
        lambda_=call.shared["lambda"],
        normalize=bool(call.shared["normalize"]),
        out_dtype=call.out_dtype,
    )


SPEC = MethodSpec(
    name="task_arithmetic",
    base="required",
    min_inputs=1,
    max_inputs=None,
    run=_run,
    params=(
        ParamSpec("weight", "non_base", 1.0, doc="Weight of the model's task vector."),
        ParamSpec("lambda", "shared", 1.0, doc="Scale of the summed task vectors."),
        ParamSpec("normalize", "shared", 0.0, kind="bool", doc="Divide by the sum of weights."),
        ParamSpec("int8_mask", "shared", 0.0, kind="bool", doc="Accepted for mergekit configs; no effect."),
    ),
    doc="Add weighted task vectors (model - base) to the base.",
)
