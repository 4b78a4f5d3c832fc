"""Padding-free (varlen) attention for packed rows.

A micro-batch is one flat token stream with segment boundaries ``cu_seqlens`` (see
``data.collate``). On a GPU with flash-attn installed, transformers' ``flash_attention_2``
consumes those boundaries directly (``flash_attn_varlen_func``). Everywhere else we register
``branchmerge_varlen``: causal SDPA once per segment. Measured on the CPU we develop on, that
beats both a block-diagonal mask (dense T×T work, mostly masked) and one flattened causal row
(documents attending to each other, and quadratic in the row length) — see
``docs/training.md``. Because this attention function builds no mask, transformers skips mask
creation for it entirely.
"""

from __future__ import annotations

import importlib.util
import itertools
from typing import Any

import torch
import torch.nn.functional as F

VARLEN = "branchmerge_varlen"

#: On CPU in bf16, segments up to this length run as two bf16 matmuls and an fp32 softmax:
#: measured ~8% faster per training step than the CPU flash kernel for 200–650-token
#: documents (the matmuls hit the bf16 GEMM peak; the flash kernel does not). Longer ones use
#: SDPA, whose memory does not grow with the square of the length.
_SMALL_SEGMENT = 1024


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each segment of ``cu_seq_lens_q``; inputs ``[1, H, T, D]``,
    output ``[1, T, H, D]`` (transformers' attention-interface convention)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        if attention_mask is not None:
            raise ValueError(f"{VARLEN} attention needs cu_seq_lens_q, not an attention mask")
        bounds = [0, query.shape[2]]
    else:
        if query.shape[0] != 1:
            raise ValueError(f"{VARLEN} attention expects one flattened row, got batch {query.shape[0]}")
        bounds = cu.tolist()
    window = getattr(module, "sliding_window", None)
    if window is not None and max(b - a for a, b in itertools.pairwise(bounds)) > window:
        raise NotImplementedError(f"{VARLEN}: segments longer than the sliding window ({window})")
    groups = int(getattr(module, "num_key_value_groups", 1))
    if groups > 1:  # once per layer is cheaper than letting every segment call expand K/V
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    small_ok = query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16) and dropout == 0.0
    outs = [
        _small_causal(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], scaling)
        if small_ok and b - a <= _SMALL_SEGMENT
        else F.scaled_dot_product_attention(
            query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout, is_causal=True, scale=scaling
        )
        for a, b in itertools.pairwise(bounds)
    ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _small_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal attention of one short segment: scores in the input dtype, softmax in fp32."""
    n = q.shape[2]
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (scale if scale is not None else q.shape[-1] ** -0.5)
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1)
    probs = scores.masked_fill_(future, float("-inf")).softmax(-1).to(q.dtype)
    return torch.matmul(probs, v)


def register() -> None:
    """Make ``branchmerge_varlen`` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, segment_attention)


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose_implementation(device: torch.device) -> str:
    """flash-attention-2 varlen on CUDA when installed, else per-segment SDPA."""
    if device.type == "cuda" and flash_attn_available():
        return "flash_attention_2"
    register()
    return VARLEN


def varlen_kwargs(cu_seqlens: torch.Tensor, max_seqlen: int) -> dict[str, Any]:
    """The keyword arguments transformers forwards from the model call to every attention
    layer (the names flash-attention's varlen path expects)."""
    return {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": max_seqlen,
        "max_length_k": max_seqlen,
    }
