"""TIES merging: keep each task vector's top-``density`` magnitudes, elect a sign per
element from the weighted sum, add only the agreeing deltas, divide by their weights.

Top-k keeps exactly ``max(1, int(density * n))`` elements per task vector, ties at the
threshold broken by lowest index (mergekit keeps whatever order its argsort returns).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._task_vectors import combine, task_vector_params
from .spec import MergeCall, MethodSpec


def ties(
    base: Tensor,
    others: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    lambda_: float = 1.0,
    normalize: bool = True,
    rescale: bool = False,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """TIES merge of ``others`` onto ``base``."""
    return combine(
        base, others, weights, densities, sparsify="magnitude", consensus=True,
        normalize=normalize, rescale=rescale, lambda_=lambda_, out_dtype=out_dtype,
    )  # fmt: skip


def _run(call: MergeCall) -> Tensor:
    assert call.base is not None
    idx = call.others()
    return ties(
        call.tensors[call.base],
        [call.tensors[i] for i in idx],
        [call.params[i]["weight"] for i in idx],
        [call.params[i]["density"] for i in idx],
        lambda_=call.shared["lambda"],
        normalize=bool(call.shared["normalize"]),
        rescale=bool(call.shared["rescale"]),
        out_dtype=call.out_dtype,
    )


SPEC = MethodSpec(
    name="ties",
    base="required",
    min_inputs=2,
    max_inputs=None,
    run=_run,
    params=task_vector_params(normalize=True, rescale=False),
    doc="Trim task vectors to their largest magnitudes, elect signs, average the agreeing ones.",
)
