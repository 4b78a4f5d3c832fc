"""DARE-TIES: drop each task-vector element with probability 1 - ``density``
(Bernoulli mask from a seeded counter-based RNG), restore the L1 norm of what is kept
(mergekit's rescaling), then combine them like TIES (sign election over the weighted vectors)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._task_vectors import combine, task_vector_params
from .spec import MergeCall, MethodSpec


def dare_ties(
    base: Tensor,
    others: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    key: int,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """DARE merge with TIES sign consensus; ``key`` selects the random stream."""
    return combine(
        base, others, weights, densities, sparsify="random", consensus=True,
        normalize=normalize, rescale=rescale, lambda_=lambda_, key=key, out_dtype=out_dtype,
    )  # fmt: skip


def _run(call: MergeCall) -> Tensor:
    assert call.base is not None
    idx = call.others()
    return dare_ties(
        call.tensors[call.base],
        [call.tensors[i] for i in idx],
        [call.params[i]["weight"] for i in idx],
        [call.params[i]["density"] for i in idx],
        key=call.key,
        lambda_=call.shared["lambda"],
        normalize=bool(call.shared["normalize"]),
        rescale=bool(call.shared["rescale"]),
        out_dtype=call.out_dtype,
    )


SPEC = MethodSpec(
    name="dare_ties",
    base="required",
    min_inputs=2,
    max_inputs=None,
    run=_run,
    params=task_vector_params(normalize=False, rescale=True),
    doc="Randomly drop task-vector elements, rescale, elect signs, add the agreeing ones.",
)
