"""Input checkpoints: what a Hugging Face model directory holds, learned without reading a
single weight, and a reader that fetches exactly one tensor's bytes when asked.

A model is either the committed output of one of our stages (it has ``_MANIFEST.json``; the
files must match it) or a plain Hugging Face directory supplied by the user. Inputs can be
local paths or S3 prefixes: headers come from ranged reads, so an S3 model is validated and
merged without ever being downloaded as a whole.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..runtime import StageInputError
from ..stages import ModelRef
from ..storage import MANIFEST, ChecksumError, Manifest, NotCommittedError, Storage, join
from .safetensors_io import DTYPES, HeaderError, TensorEntry, parse_header

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
#: Files that make up a tokenizer (whichever exist are copied to the output).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "vocab.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class TensorLocation:
    file: str  # absolute URI of the safetensors file
    entry: TensorEntry


@dataclass
class Checkpoint:
    name: str
    uri: str
    storage: Storage
    config: dict[str, Any]
    tensors: dict[str, TensorLocation]
    files: dict[str, int]  # relative path -> size
    manifest: Manifest | None = None
    order: list[str] = field(default_factory=list)  # tensor names in file order

    def has(self, rel: str) -> bool:
        return rel in self.files

    def read_file(self, rel: str) -> bytes:
        return self.storage.read_bytes(join(self.uri, rel))

    def tokenizer_files(self) -> list[str]:
        return [f for f in TOKENIZER_FILES if f in self.files]

    @property
    def weight_bytes(self) -> int:
        return sum(loc.entry.nbytes for loc in self.tensors.values())


def _fail(name: str, uri: str, what: str) -> StageInputError:
    return StageInputError(f"model {name!r} ({uri}): {what}")


def open_checkpoint(
    name: str, ref: ModelRef, storage: Storage, *, require_manifest: bool = False
) -> Checkpoint:
    """List and check a model directory and parse every shard header; raises
    StageInputError / NotCommittedError / ChecksumError naming the model and file."""
    uri = ref.uri.rstrip("/")
    files = {o.key: o.size for o in storage.list(uri) if o.key and not o.key.startswith(".")}
    if not files:
        raise _fail(name, uri, "nothing found there; check the URI (and credentials for S3)")
    manifest = None
    if MANIFEST in files:
        try:
            manifest = storage.read_manifest(uri)
        except NotCommittedError as e:
            raise NotCommittedError(f"model {name!r}: {e}") from None
        for fe in manifest.files:
            size = files.get(fe.path)
            if size is None:
                raise ChecksumError(
                    f"model {name!r} ({uri}): {fe.path} is listed in the manifest but missing"
                )
            if size != fe.size:
                raise ChecksumError(
                    f"model {name!r} ({uri}): {fe.path} has {size} bytes, the manifest says {fe.size} "
                    "(corrupt or partial)"
                )
    elif require_manifest:
        raise NotCommittedError(
            f"model {name!r} ({uri}): no {MANIFEST}; the stage that produces it has not finished (or failed)"
        )
    if "config.json" not in files:
        raise _fail(name, uri, "no config.json; is this a Hugging Face model directory?")
    try:
        config = json.loads(storage.read_bytes(join(uri, "config.json")))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(name, uri, f"config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise _fail(name, uri, "config.json is not a JSON object")

    weight_map: dict[str, str] | None = None
    if INDEX in files:
        try:
            index = json.loads(storage.read_bytes(join(uri, INDEX)))
            weight_map = {str(k): str(v) for k, v in index["weight_map"].items()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise _fail(name, uri, f"{INDEX} is corrupt ({e.__class__.__name__}: {e})") from None
        shard_names = sorted(set(weight_map.values()))
        for shard in shard_names:
            if shard not in files:
                tensor = next(t for t, f in weight_map.items() if f == shard)
                raise _fail(name, uri, f"shard {shard} (holding tensor {tensor!r}) is missing")
    elif SINGLE in files:
        shard_names = [SINGLE]
    else:
        shard_names = sorted(f for f in files if f.endswith(".safetensors") and "/" not in f)
    if not shard_names:
        if any(f.endswith((".bin", ".pt", ".pth")) for f in files):
            raise _fail(
                name,
                uri,
                "has only pickle weights (.bin); convert it to safetensors (save_pretrained does by default)",
            )
        raise _fail(name, uri, "no *.safetensors weights found")

    tensors: dict[str, TensorLocation] = {}
    order: list[str] = []
    for shard in shard_names:
        file_uri = join(uri, shard)

        def read(off: int, n: int, u: str = file_uri) -> bytes:
            return storage.read_range(u, off, n)

        try:
            header = parse_header(read, files[shard], f"model {name!r}: {shard}")
        except HeaderError as e:
            raise StageInputError(str(e)) from None
        for tname, entry in sorted(header.tensors.items(), key=lambda kv: kv[1].start):
            if tname in tensors:
                raise _fail(name, uri, f"tensor {tname!r} appears in two shards")
            if weight_map is not None and weight_map.get(tname, shard) != shard:
                continue  # the index points elsewhere; checked below
            tensors[tname] = TensorLocation(file_uri, entry)
            order.append(tname)
    if weight_map is not None:
        for tname, shard in weight_map.items():
            if tname not in tensors:
                raise _fail(
                    name, uri, f"{INDEX} says tensor {tname!r} is in {shard}, but that file does not hold it"
                )
    return Checkpoint(name=name, uri=uri, storage=storage, config=config, tensors=tensors, files=files,
                      manifest=manifest, order=order)  # fmt: skip


class TensorReader:
    """Reads one tensor into a fresh CPU buffer: ``pread`` for local files (no mmap, so the
    page cache is not charged to this process), one ranged GET for S3. Thread-safe."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._bytes = 0

    @property
    def bytes_read(self) -> int:
        return self._bytes

    def _fd(self, path: Path) -> int:
        key = str(path)
        with self._lock:
            fd = self._fds.get(key)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                self._fds[key] = fd
            return fd

    def read(self, ckpt: Checkpoint, tensor: str) -> torch.Tensor:
        loc = ckpt.tensors[tensor]
        entry = loc.entry
        dtype = DTYPES[entry.dtype][0]
        buf = bytearray(entry.nbytes)
        local = ckpt.storage.local_path(loc.file)
        if local is not None:
            fd = self._fd(local)
            view = memoryview(buf)
            done = 0
            while done < entry.nbytes:
                n = os.preadv(fd, [view[done:]], entry.start + done)
                if n <= 0:
                    raise StageInputError(
                        f"model {ckpt.name!r}: {loc.file} ended early while reading {tensor!r}"
                    )
                done += n
        elif entry.nbytes:
            data = ckpt.storage.read_range(loc.file, entry.start, entry.nbytes)
            if len(data) != entry.nbytes:
                raise StageInputError(f"model {ckpt.name!r}: short read of {tensor!r} from {loc.file}")
            buf[:] = data
            del data
        with self._lock:
            self._bytes += entry.nbytes
        if not entry.nbytes:
            return torch.empty(entry.shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(entry.shape)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
