"""SLERP: spherical interpolation between the base (t = 0) and the other model (t = 1),
over the whole tensor; linear interpolation when the two are nearly colinear."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._common import compute_dtype, flat_chunks
from .spec import MergeCall, MethodSpec, ParamSpec

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp(t: float, v0: Tensor, v1: Tensor, *, out_dtype: torch.dtype | None = None) -> Tensor:
    """Interpolate from ``v0`` to ``v1`` by ``t`` along the great circle of their directions."""
    out_dtype = out_dtype or v0.dtype
    dtype = compute_dtype(v0)
    a, b = v0.reshape(-1), v1.reshape(-1)
    spans = list(flat_chunks(a.numel()))
    sq_a = sq_b = dot = 0.0
    for s in spans:
        x, y = a[s].to(torch.float64), b[s].to(torch.float64)
        sq_a += float((x * x).sum())
        sq_b += float((y * y).sum())
        dot += float((x * y).sum())
    norm_a = math.sqrt(sq_a) if math.sqrt(sq_a) > EPS else 1.0
    norm_b = math.sqrt(sq_b) if math.sqrt(sq_b) > EPS else 1.0
    cos = max(-1.0, min(1.0, dot / (norm_a * norm_b)))
    if abs(cos) > DOT_THRESHOLD:
        coef_a, coef_b = 1.0 - t, t
    else:
        theta = math.acos(cos)
        coef_a = math.sin((1.0 - t) * theta) / math.sin(theta)
        coef_b = math.sin(t * theta) / math.sin(theta)
    out = torch.empty(v0.shape, dtype=out_dtype, device=v0.device)
    out_flat = out.reshape(-1)
    for s in spans:
        out_flat[s] = a[s].to(dtype) * coef_a + b[s].to(dtype) * coef_b
    return out


def _run(call: MergeCall) -> Tensor:
    assert call.base is not None
    other = call.others()[0]
    return slerp(call.shared["t"], call.tensors[call.base], call.tensors[other], out_dtype=call.out_dtype)


SPEC = MethodSpec(
    name="slerp",
    base="required",
    min_inputs=2,
    max_inputs=2,
    run=_run,
    params=(ParamSpec("t", "shared", None, doc="Interpolation factor: 0 is the base, 1 the other model."),),
    doc="Spherical interpolation between two models.",
)
