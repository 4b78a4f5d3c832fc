"""Exact order statistics by radix histograms over the floats' bit patterns.

Why: mergekit sorts (or argsorts) whole tensors to find quantiles and top-k magnitudes,
which is O(n log n) time and several full-size temporaries. Mapping each float's bits to an
integer key that sorts like the value turns selection into ``bincount`` passes over chunks:
O(n), no temporaries beyond a chunk, and exactly the same element as a sort would return
(16-bit dtypes take one pass, float32 two).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
_BITS = {torch.int16: 16, torch.int32: 32}


def _keys(x: Tensor) -> Tensor:
    """Signed int32 keys with the same order as the float values (NaN last): negative
    floats get their magnitude bits flipped so that larger magnitudes sort lower."""
    itype = _INT[x.dtype]
    b = x.contiguous().view(itype)
    if itype != torch.int32:
        b = b.to(torch.int32)
    sign_fill = (b >> 31) & 0x7FFFFFFF if itype == torch.int32 else (b >> 15) & 0x7FFF
    key = b ^ sign_fill
    return key + (key == -1)  # -0.0 maps to -1: give it +0.0's key, they are equal values


def _value(key: int, dtype: torch.dtype) -> Tensor:
    itype = _INT[dtype]
    bits = _BITS[itype]
    if key < 0:  # the key map is its own inverse
        key ^= (1 << (bits - 1)) - 1
    return torch.tensor([key], dtype=itype).view(dtype)[0]


def _find(cum: Tensor, rank: int) -> tuple[int, int]:
    """From a cumulative histogram: the bin holding the element of 0-based ascending
    ``rank``, and how many elements lie in lower bins."""
    b = int(torch.searchsorted(cum, torch.tensor([rank], dtype=cum.dtype), right=True)[0])
    below = int(cum[b - 1]) if b > 0 else 0
    return b, below


def order_statistics_with_counts(
    chunks: Callable[[], Iterable[Tensor]], ranks: list[int]
) -> list[tuple[Tensor, int]]:
    """For each 0-based ascending rank: (value, number of elements <= value).

    ``chunks`` is called once per pass (twice for float32) and must yield the same values
    each time; float64 falls back to ``kthvalue`` on the concatenation.
    """
    first = next(iter(chunks()))
    dtype, device = first.dtype, first.device
    if dtype not in _INT:
        flat = torch.cat([c.reshape(-1) for c in chunks()]).cpu()
        values = [torch.kthvalue(flat, r + 1).values for r in ranks]
        return [(v, int((flat <= v).sum())) for v in values]
    bits = _BITS[_INT[dtype]]
    shift = bits - 16  # the first pass bins by the top 16 bits of the key
    hist = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for c in chunks():
        hist += torch.bincount((_keys(c.reshape(-1)) >> shift) + (1 << 15), minlength=1 << 16)
    cum = torch.cumsum(hist.cpu(), 0)
    found = [_find(cum, r) for r in ranks]
    if shift == 0:
        return [(_value(b - (1 << 15), dtype), int(cum[b])) for b, _ in found]
    tops = sorted({b for b, _ in found})
    lows = {t: torch.zeros(1 << 16, dtype=torch.int64, device=device) for t in tops}
    for c in chunks():
        k = _keys(c.reshape(-1))
        top = k >> shift
        for t in tops:
            sel = k[top == t - (1 << 15)] & 0xFFFF
            if sel.numel():
                lows[t] += torch.bincount(sel, minlength=1 << 16)
    out = []
    for (b, below), r in zip(found, ranks, strict=True):
        low_cum = torch.cumsum(lows[b].cpu(), 0)
        low, _ = _find(low_cum, r - below)
        key = ((b - (1 << 15)) << shift) | low
        out.append((_value(key, dtype), below + int(low_cum[low])))
    return out


def order_statistics(chunks: Callable[[], Iterable[Tensor]], ranks: list[int]) -> list[Tensor]:
    """Values at 0-based ascending ``ranks`` (see ``order_statistics_with_counts``)."""
    return [v for v, _ in order_statistics_with_counts(chunks, ranks)]


def kth_largest_with_count(chunks: Callable[[], Iterable[Tensor]], numel: int, k: int) -> tuple[Tensor, int]:
    """The k-th largest value (1-based) and how many elements are strictly larger."""
    ((value, at_most),) = order_statistics_with_counts(chunks, [numel - k])
    return value, numel - at_most
