"""The streaming merge engine: one output tensor at a time, the whole chain of steps at once.

For each output tensor (in the output's file order) a worker reads that tensor from every
input model, runs every step of the plan on it (intermediates live only as long as a later
step needs them), and hands the result to the writer, which appends it to the current
shard. Reads and compute of the next tensors overlap with writing, bounded by a byte budget
(``prefetchMb``): memory is that budget plus one tensor's working set, independent of model
size. Workers are threads: file reads, torch kernels and hashing all release the GIL, and
torch runs single-threaded per worker so that the cores are shared without oversubscription.

Output files are written where they will be published (a local output) or to a staging
directory (S3), with their sha256 computed on the way so nothing is read back for the
manifest; the caller publishes the manifest last.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..storage import StorageError
from .checkpoint import TensorReader
from .methods import MergeCall
from .methods._common import seed_key
from .plan import MergePlan, TensorPlan
from .safetensors_io import DTYPES, ShardLayout

log = logging.getLogger("branchmerge.merge")

#: Start writeback every this many bytes written, so the final fsync is short and dirty page
#: cache does not pile up on small machines.
SYNC_EVERY = 256 * 1024 * 1024

ProgressFn = Callable[[int, int, int, int], None]  # tensors done, tensors, bytes done, bytes


@dataclass
class EngineStats:
    tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    peak_inflight_bytes: int = 0
    digests: dict[str, str] = field(default_factory=dict)
    fused: dict[str, list[int]] = field(default_factory=dict)  # arcee step -> [from other, total]


class Aborted(Exception):
    """Another thread failed; this one stops quietly."""


class Budget:
    """Bytes in flight. A request larger than the whole budget still proceeds when nothing
    else is in flight, so one huge tensor never deadlocks the pipeline."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self.failed: BaseException | None = None
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            while self.failed is None and self.used > 0 and self.used + n > self.capacity:
                self._cond.wait()
            if self.failed is not None:
                raise Aborted
            self.used += n
            self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            if self.failed is None:
                self.failed = exc
            self._cond.notify_all()


class ShardWriter:
    """Writes planned shards in order: header first, then each tensor's bytes as it comes,
    hashing along the way."""

    def __init__(self, shards: list[ShardLayout], out_dir: Path) -> None:
        self._shards = shards
        self._dir = out_dir
        self._shard = -1
        self._pos = 0  # index within the current shard
        self._file: int | None = None
        self._hash = hashlib.sha256()
        self._unsynced = 0
        self.digests: dict[str, str] = {}
        self.bytes_written = 0
        self._next_shard()

    def _write(self, data: memoryview | bytes) -> None:
        assert self._file is not None
        view = memoryview(data)
        while view.nbytes:
            n = os.write(self._file, view)
            view = view[n:]
        self._hash.update(data)
        self.bytes_written += len(data)
        self._unsynced += len(data)
        if self._unsynced >= SYNC_EVERY:
            # Start writeback of what is written so far without waiting for it (and drop it
            # from the page cache once clean): the final fsync then has little left to do.
            os.posix_fadvise(self._file, 0, 0, os.POSIX_FADV_DONTNEED)
            self._unsynced = 0

    def _close_shard(self) -> None:
        if self._file is None:
            return
        os.fsync(self._file)
        os.close(self._file)
        self._file = None
        self.digests[self._shards[self._shard].filename] = self._hash.hexdigest()

    def _next_shard(self) -> None:
        self._close_shard()
        self._shard += 1
        self._pos = 0
        if self._shard >= len(self._shards):
            return
        shard = self._shards[self._shard]
        self._file = os.open(self._dir / shard.filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._hash = hashlib.sha256()
        self._write(shard.header)
        if not shard.tensors:
            self._next_shard()

    def write(self, name: str, tensor: Tensor) -> None:
        shard = self._shards[self._shard]
        spec = shard.tensors[self._pos]
        dtype = DTYPES[spec.dtype][0]
        if spec.name != name or tuple(tensor.shape) != spec.shape or tensor.dtype != dtype:
            raise RuntimeError(
                f"internal error: writer expected {spec.name} {list(spec.shape)} {dtype}, "
                f"got {name} {list(tensor.shape)} {tensor.dtype}"
            )
        if spec.nbytes:
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            self._write(flat.view(torch.uint8).numpy().data)
        self._pos += 1
        if self._pos == len(shard.tensors):
            self._next_shard()

    def close(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None


def _with_tensor(exc: BaseException, tensor: str) -> BaseException:
    """Keep errors whose type carries meaning (bad input, storage, memory); wrap the rest
    so that the message names the tensor."""
    if isinstance(exc, ValueError | MemoryError | StorageError | KeyboardInterrupt):
        exc.add_note(f"while merging tensor {tensor!r}")
        return exc
    wrapped = RuntimeError(f"tensor {tensor!r}: {exc.__class__.__name__}: {exc}")
    wrapped.__cause__ = exc
    return wrapped


def compute_tensor(
    plan: MergePlan, tp: TensorPlan, reader: TensorReader, device: torch.device, seed: int
) -> tuple[Tensor, dict[str, tuple[int, int]]]:
    """Read ``tp``'s inputs and evaluate every step on them; returns the output tensor (on
    the CPU) and, per Arcee Fusion step, (elements selected from the other model, elements)."""
    if tp.kind == "copy":
        return reader.read(plan.checkpoints[tp.leaves[0]], tp.name), {}
    # Inputs are read when a step first needs them and dropped after their last use, so a
    # chain holds at most one step's inputs plus its output at a time.
    values: dict[str, Tensor] = {}
    fused: dict[str, tuple[int, int]] = {}
    result: Tensor | None = None
    for i, step in enumerate(plan.steps):
        for x in step.inputs:
            if x not in values:
                values[x] = reader.read(plan.checkpoints[x], tp.name).to(device=device, dtype=plan.work_dtype)
        inputs = [values[x].to(device=device, dtype=plan.work_dtype) for x in step.inputs]
        if tp.vocab:
            rows = min(x.shape[0] for x in inputs)
            inputs = [x[:rows] for x in inputs]
        per_input, shared = tp.params[step.name]
        call = MergeCall(
            name=tp.name,
            tensors=inputs,
            base=step.base,
            params=per_input,
            shared=shared,
            key=seed_key(seed, step.name, tp.name),
            out_dtype=plan.out_dtype,
        )
        result = step.method.run(call)
        if "fused" in call.stats:
            fused[step.name] = (int(call.stats["fused"]), result.numel())
        del inputs, call
        values[step.name] = result
        for x in step.inputs:
            if plan.last_use.get(x) == i:
                values.pop(x, None)
    assert result is not None
    return result.to("cpu"), fused


def execute(
    plan: MergePlan,
    out_dir: Path,
    *,
    seed: int = 0,
    device: torch.device | None = None,
    workers: int | None = None,
    budget_bytes: int = 256 * 1024 * 1024,
    progress: ProgressFn | None = None,
) -> EngineStats:
    """Compute every tensor of ``plan`` and write the planned shards into ``out_dir``."""
    device = device or torch.device("cpu")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers is None:
        workers = cpus + 1 if device.type == "cpu" else 2
        if any(ck.storage.local_path(ck.uri) is None for ck in plan.checkpoints.values()):
            workers += 4  # remote reads mostly wait on the network: keep more GETs in flight
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = EngineStats()
    reader = TensorReader()
    budget = Budget(budget_bytes)
    writer = ShardWriter(plan.shards, out_dir)
    results: dict[int, tuple[Tensor, dict[str, tuple[int, int]]]] = {}
    cond = threading.Condition()
    total = len(plan.tensors)
    total_bytes = plan.bytes_out
    start = time.monotonic()

    def work(tp: TensorPlan) -> None:
        try:
            if budget.failed is not None:
                return
            out = compute_tensor(plan, tp, reader, device, seed)
        except BaseException as e:  # surfaced by the main thread
            budget.fail(_with_tensor(e, tp.name))
            with cond:
                cond.notify_all()
            return
        with cond:
            results[tp.index] = out
            cond.notify_all()

    def write_all() -> None:
        try:
            for tp in plan.tensors:
                with cond:
                    while tp.index not in results and budget.failed is None:
                        cond.wait()
                    if budget.failed is not None:
                        return
                    tensor, fused = results.pop(tp.index)
                writer.write(tp.name, tensor)
                del tensor
                for step, (n_from, n_all) in fused.items():
                    acc = stats.fused.setdefault(step, [0, 0])
                    acc[0] += n_from
                    acc[1] += n_all
                budget.release(tp.est_bytes)
                stats.tensors += 1
                if progress is not None:
                    progress(stats.tensors, total, writer.bytes_written, total_bytes)
        except BaseException as e:
            budget.fail(e)
            with cond:
                cond.notify_all()

    threads = torch.get_num_threads()
    if device.type == "cpu" and workers > 1:
        torch.set_num_threads(1)
    writer_thread = threading.Thread(target=write_all, name="merge-writer", daemon=True)
    writer_thread.start()
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge") as pool:
            for tp in plan.tensors:
                try:
                    budget.acquire(tp.est_bytes)
                except Aborted:
                    break
                pool.submit(work, tp)
        writer_thread.join()
    finally:
        torch.set_num_threads(threads)
        if budget.failed is not None:
            with cond:
                cond.notify_all()
            writer_thread.join()
        writer.close()
        reader.close()
    if budget.failed is not None:
        raise budget.failed
    stats.bytes_read = reader.bytes_read
    stats.bytes_written = writer.bytes_written
    stats.digests = dict(writer.digests)
    stats.peak_inflight_bytes = budget.peak
    stats.seconds = time.monotonic() - start
    return stats
