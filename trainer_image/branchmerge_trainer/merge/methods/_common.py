"""Helpers shared by the merge methods: chunking, a counter-based RNG, exact top-k masks.

Methods work chunk by chunk so that their scratch memory stays a small constant (a few
hundred KiB per input, which also keeps elementwise passes in cache) instead of several
copies of the tensor. Every helper is deterministic and gives the same bits on CPU and CUDA.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

from ._select import kth_largest_with_count

#: Elements per chunk of elementwise work: big enough to amortise Python overhead, small
#: enough that a handful of float32 temporaries stay in a core's L2 cache.
CHUNK_ELEMENTS = 1 << 18


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def flat_chunks(numel: int, chunk: int = CHUNK_ELEMENTS) -> Iterator[slice]:
    """Contiguous slices covering ``range(numel)``."""
    for start in range(0, numel, chunk):
        yield slice(start, min(numel, start + chunk))


def as_rows(t: Tensor) -> Tensor:
    """A 2-D view [rows, last dim]; a scalar or vector becomes one row."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    return t.reshape(-1, t.shape[-1])


def row_chunks(rows: int, cols: int, chunk: int = CHUNK_ELEMENTS) -> Iterator[slice]:
    """Slices of whole rows holding about ``chunk`` elements (at least one row)."""
    step = max(1, chunk // max(1, cols))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def seed_key(*parts: object) -> int:
    """A signed 64-bit key from any parts (stage seed, step, tensor, input index)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M2 = -7723592293110705685  # 0x94D049BB133111EB


def _shr(x: Tensor, n: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def splitmix64(counter: Tensor, key: int) -> Tensor:
    """SplitMix64 of ``key + counter * golden``: a counter-based RNG, so any chunk of the
    stream can be generated independently and CPU and CUDA agree bit for bit."""
    x = counter * _GOLDEN + key
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def uniform_below(key: int, span: slice, p: float, device: torch.device) -> Tensor:
    """Bernoulli(p) draws for the elements ``span`` of the stream ``key`` (the same draws as
    ``uniform(...) < p``, compared on the integers)."""
    counter = torch.arange(span.start, span.stop, dtype=torch.int64, device=device)
    return _shr(splitmix64(counter, key), 11) < math.ceil(p * (1 << 53))


def uniform(key: int, span: slice, device: torch.device) -> Tensor:
    """Uniform float64 in [0, 1) for the elements ``span`` of the stream ``key``."""
    counter = torch.arange(span.start, span.stop, dtype=torch.int64, device=device)
    return _shr(splitmix64(counter, key), 11).to(torch.float64) * (1.0 / (1 << 53))


class TopKMask:
    """Exactly ``k`` largest values of one tensor, ties broken by lowest flat index (what a
    stable descending sort keeps), applied chunk by chunk in flat order.

    ``chunks`` yields the values in flat order (called twice or thrice); the threshold
    comes from an exact radix selection over all of them.
    """

    def __init__(self, chunks: Callable[[], Iterable[Tensor]], numel: int, k: int) -> None:
        self.keep_all = k >= numel
        self.keep_none = k <= 0
        self.threshold: Tensor | None = None
        self._equal_quota = 0
        self._equal_seen = 0
        if not (self.keep_all or self.keep_none):
            self.threshold, above = kth_largest_with_count(chunks, numel, k)
            self._equal_quota = k - above

    def reset(self) -> None:
        """Start again from the first chunk (for another pass over the tensor)."""
        self._equal_seen = 0

    def __call__(self, chunk: Tensor) -> Tensor:
        """0/1 mask (in the chunk's dtype) for the next chunk."""
        if self.keep_all:
            return torch.ones_like(chunk)
        if self.keep_none or self.threshold is None:
            return torch.zeros_like(chunk)
        thr = float(self.threshold)  # exact for float32/float64; a scalar avoids a slow broadcast
        keep = (chunk - thr).sign_().clamp_(min=0)  # 1 where above the threshold
        if self._equal_quota > self._equal_seen:
            equal = chunk == thr
            rank = torch.cumsum(equal.reshape(-1), 0).reshape(equal.shape) + self._equal_seen
            self._equal_seen += int(equal.sum())
            keep += (equal & (rank <= self._equal_quota)).to(chunk.dtype)
        return keep
