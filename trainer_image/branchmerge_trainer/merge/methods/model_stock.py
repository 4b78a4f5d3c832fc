"""Model Stock: interpolate between the base and the average of the fine-tunes by
t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine of their task vectors.

``filter_wise`` computes one t per row (first dimension) instead of one per tensor. Where
1 + (N - 1) cos is ~0 there is no finite estimate and the base is kept (like mergekit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._common import compute_dtype, row_chunks
from .spec import MergeCall, MethodSpec, ParamSpec


def _rows(t: Tensor, filter_wise: bool) -> Tensor:
    if not filter_wise:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)


def model_stock(
    base: Tensor, others: Sequence[Tensor], *, filter_wise: bool = False, out_dtype: torch.dtype | None = None
) -> Tensor:
    """Model Stock of ``others`` (at least two) around ``base``."""
    if len(others) < 2:
        raise ValueError("model_stock needs at least two models besides the base")
    out_dtype = out_dtype or base.dtype
    dtype = compute_dtype(base)
    w0 = _rows(base, filter_wise)
    ws = [_rows(t, filter_wise) for t in others]
    rows, cols = w0.shape
    n = len(ws)
    # Gram matrix of the task vectors per row, accumulated over column chunks (float64).
    gram = torch.zeros((rows, n, n), dtype=torch.float64, device=base.device)
    col_step = max(1, (1 << 18) // max(1, rows)) if not filter_wise else cols
    for r in row_chunks(rows, cols):
        for c0 in range(0, cols, col_step):
            c = slice(c0, min(cols, c0 + col_step))
            b = w0[r, c].to(torch.float64)
            offs = torch.stack([w[r, c].to(torch.float64) - b for w in ws], dim=1)  # [r, n, c]
            gram[r] += offs @ offs.transpose(1, 2)
    norms = gram.diagonal(dim1=1, dim2=2).sqrt()  # [rows, n]
    cos_terms = []
    for i in range(n):
        for j in range(i + 1, n):
            denom = (norms[:, i] * norms[:, j]).clamp(min=1e-6)
            cos_terms.append((gram[:, i, j] / denom).clamp(-1, 1))
    cos = torch.stack(cos_terms).mean(0)  # [rows]
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator)).to(dtype)[:, None]
    out = torch.empty(w0.shape, dtype=out_dtype, device=base.device)
    for r in row_chunks(rows, cols):
        for c0 in range(0, cols, col_step):
            c = slice(c0, min(cols, c0 + col_step))
            avg = torch.stack([w[r, c].to(dtype) for w in ws]).mean(0)
            out[r, c] = t[r] * avg + (1 - t[r]) * w0[r, c].to(dtype)
    return out.reshape(base.shape)


def _run(call: MergeCall) -> Tensor:
    assert call.base is not None
    return model_stock(
        call.tensors[call.base],
        [call.tensors[i] for i in call.others()],
        filter_wise=bool(call.shared["filter_wise"]),
        out_dtype=call.out_dtype,
    )


SPEC = MethodSpec(
    name="model_stock",
    base="required",
    min_inputs=3,
    max_inputs=None,
    run=_run,
    params=(ParamSpec("filter_wise", "shared", 0.0, kind="bool", doc="One interpolation factor per row."),),
    doc="Interpolate base and fine-tune average by their task vectors' geometry.",
)
