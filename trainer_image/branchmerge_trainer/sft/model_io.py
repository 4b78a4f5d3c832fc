"""Getting a Hugging Face model directory out of storage, and writing the trained one back."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from ..runtime import StageInputError
from ..stages import ModelRef, StorageConfig
from ..storage import MANIFEST, storage_for

log = logging.getLogger("branchmerge.sft.model")

_DONE = ".branchmerge-complete"


def fetch_model(ref: ModelRef, storage_config: StorageConfig, cache_dir: Path) -> Path:
    """A local directory holding the model at ``ref.uri``.

    A committed prefix (an earlier stage's output) is verified against its manifest. A
    hand-uploaded model without a manifest is used as is: in place when it is local,
    otherwise downloaded once into the cache (marked complete only after every file landed).
    """
    storage = storage_for(ref.uri, storage_config)
    if storage.committed(ref.uri) is not None:
        local, _ = storage.materialize(ref.uri, cache_dir / "models")
        return local
    local_path = storage.local_path(ref.uri)
    if local_path is not None:
        if not (local_path / "config.json").exists():
            raise StageInputError(f"{ref.uri}: no config.json; student.uri must be a Hugging Face model directory")
        return local_path
    dest = cache_dir / "models" / hashlib.sha256(ref.uri.encode()).hexdigest()[:16]
    if (dest / _DONE).exists():
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    objects = [o for o in storage.list(ref.uri) if o.key and o.key != MANIFEST]
    if not any(o.key == "config.json" for o in objects):
        raise StageInputError(f"{ref.uri}: no config.json; student.uri must be a Hugging Face model directory")
    for obj in objects:
        storage.download_file(f"{ref.uri.rstrip('/')}/{obj.key}", dest / obj.key)
    (dest / _DONE).write_text("")
    return dest


def saved_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the student was stored in; the trained model is written back in it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    value: Any = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and hasattr(torch, value):
        dtype = getattr(torch, value)
        if isinstance(dtype, torch.dtype):
            return dtype
    return torch.float32


def save_hf_dir(model: Any, tokenizer: Any, out_dir: Path, *, max_shard_size: str = "5GB") -> None:
    """safetensors shards (+ index when sharded), config, generation config, tokenizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True  # for whoever generates with it next
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
