"""The safetensors format, read and written by hand.

Why not only ``safetensors.safe_open``: it needs a local file (an S3 model would have to be
downloaded whole before the first check), and it maps files into memory, so the page cache
of every input counts as the merge's resident memory. Parsing the header ourselves lets
validation run from a few ranged reads, and lets the engine ``pread`` exactly one tensor's
bytes into a buffer it owns. Writing is planned: every output tensor's shape and dtype is
known before the first weight is read, so each shard's header is written first and tensor
bytes are appended as they are computed, in order, with nothing buffered.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

#: safetensors dtype code -> (torch dtype, bytes per element).
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
CODE_OF = {dtype: code for code, (dtype, _) in DTYPES.items()}
#: A header larger than this is certainly corrupt (a 70B shard's header is ~100 KiB).
MAX_HEADER = 100 * 1024 * 1024
#: First read when sniffing a header: usually holds all of it, saving a round trip on S3.
HEADER_PROBE = 256 * 1024


class HeaderError(ValueError):
    """A safetensors file whose header cannot be trusted."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of one safetensors file; ``start`` is an absolute byte offset."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int


def parse_header(read: Callable[[int, int], bytes], file_size: int, where: str) -> Header:
    """Parse and check a header using ``read(offset, length)``; HeaderError names ``where``
    and what is wrong (truncated file, bad JSON, unknown dtype, offsets out of range …)."""
    if file_size < 8:
        raise HeaderError(f"{where}: {file_size} bytes is too short for a safetensors file")
    probe = read(0, min(file_size, HEADER_PROBE))
    (length,) = struct.unpack("<Q", probe[:8])
    if length > MAX_HEADER or 8 + length > file_size:
        raise HeaderError(
            f"{where}: corrupt safetensors header (declares {length} header bytes in a {file_size}-byte file)"
        )
    raw = probe[8 : 8 + length]
    if len(raw) < length:
        raw += read(8 + len(raw), length - len(raw))
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError(f"{where}: corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(data, dict):
        raise HeaderError(f"{where}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + length
    data_size = file_size - data_start
    metadata = data.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise HeaderError(f"{where}: corrupt safetensors header (__metadata__ is not an object)")
    tensors: dict[str, TensorEntry] = {}
    for name, info in data.items():
        try:
            code = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise HeaderError(
                f"{where}: corrupt safetensors header (bad entry for tensor {name!r})"
            ) from None
        if code not in DTYPES and not code.startswith("F8"):
            raise HeaderError(f"{where}: tensor {name!r} has unknown dtype {code!r}")
        itemsize = DTYPES[code][1] if code in DTYPES else 1
        if any(d < 0 for d in shape) or end - begin != math.prod(shape) * itemsize:
            raise HeaderError(
                f"{where}: tensor {name!r}: offsets {begin}..{end} do not match shape {list(shape)} {code}"
            )
        if begin < 0 or end > data_size:
            raise HeaderError(
                f"{where}: tensor {name!r} lies outside the file (bytes {begin}..{end} of {data_size}); "
                "the file is truncated or corrupt"
            )
        tensors[name] = TensorEntry(name, code, shape, data_start + begin, end - begin)
    return Header(
        tensors=tensors, metadata={str(k): str(v) for k, v in metadata.items()}, data_start=data_start
    )


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


@dataclass(frozen=True)
class ShardLayout:
    """One output file: its name, its tensors in write order, and its header bytes."""

    filename: str
    tensors: tuple[OutTensor, ...]
    header: bytes

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.nbytes for t in self.tensors)


def encode_header(tensors: Sequence[OutTensor], metadata: dict[str, str] | None = None) -> bytes:
    """Length prefix + JSON header (padded with spaces to 8-byte alignment)."""
    entries: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        entries[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    body = json.dumps(entries, separators=(",", ":")).encode()
    body += b" " * (-(len(body) + 8) % 8)
    return struct.pack("<Q", len(body)) + body


def plan_shards(tensors: Sequence[OutTensor], max_shard_bytes: int) -> list[ShardLayout]:
    """Greedy split into files of at most ``max_shard_bytes`` of tensor data (a tensor larger
    than that gets a file of its own), named like transformers names them."""
    groups: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    shards = []
    for i, group in enumerate(groups):
        name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        shards.append(ShardLayout(filename=name, tensors=tuple(group), header=encode_header(group)))
    return shards


def index_json(shards: Sequence[ShardLayout]) -> bytes:
    """``model.safetensors.index.json`` for a multi-file checkpoint."""
    weight_map = {t.name: s.filename for s in shards for t in s.tensors}
    total = sum(t.nbytes for s in shards for t in s.tensors)
    return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode()
