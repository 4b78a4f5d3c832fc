"""``branchmerge-train merge``: plan (validate everything), stream the merge, publish.

The output is a Hugging Face model directory (shards, index, config, generation config and
the tokenizer of ``tokenizerSource``) plus ``_MANIFEST.json`` written last. A local output is
written in place (readers ignore a prefix without a manifest; a failure removes what was
written); an S3 output is staged on local disk and uploaded by ``publish_dir``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from ..runtime import StageContext, StageInputError
from ..stages import MergeStage, Progress, StageResult
from ..storage import MANIFEST
from .engine import EngineStats, execute
from .plan import MergePlan, build_plan
from .safetensors_io import index_json

log = logging.getLogger("branchmerge.merge")


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise StageInputError("device: cuda was requested but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


def _write_small(out_dir: Path, rel: str, data: bytes, digests: dict[str, str]) -> int:
    path = out_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    digests[rel] = hashlib.sha256(data).hexdigest()
    return len(data)


def write_metadata(plan: MergePlan, out_dir: Path, digests: dict[str, str]) -> int:
    """Index (multi-shard), config, generation config and tokenizer files; returns bytes."""
    n = 0
    if len(plan.shards) > 1:
        n += _write_small(out_dir, "model.safetensors.index.json", index_json(plan.shards), digests)
    n += _write_small(
        out_dir, "config.json", json.dumps(plan.out_config, indent=2, sort_keys=True).encode(), digests
    )
    src = plan.checkpoints[plan.config_source]
    if src.has("generation_config.json"):
        n += _write_small(out_dir, "generation_config.json", src.read_file("generation_config.json"), digests)
    tok = plan.checkpoints[plan.tokenizer_source]
    for rel in tok.tokenizer_files():
        n += _write_small(out_dir, rel, tok.read_file(rel), digests)
    return n


def output_names(plan: MergePlan) -> set[str]:
    """Every file name this merge writes."""
    names = {s.filename for s in plan.shards}
    names |= {"model.safetensors.index.json", "config.json", "generation_config.json"}
    names |= set(plan.checkpoints[plan.tokenizer_source].tokenizer_files())
    return names


def _remove_ours(out_dir: Path, names: set[str], *, strict: bool) -> None:
    """Delete files a merge writes (and its shards from any earlier shard count) from
    ``out_dir``; with ``strict``, refuse to write into a directory holding other files."""
    if not out_dir.is_dir():
        return
    for path in out_dir.iterdir():
        mine = path.name in names or (path.name.startswith("model-") and path.name.endswith(".safetensors"))
        if path.is_file() and mine:
            path.unlink()
        elif strict:
            raise StageInputError(
                f"output {out_dir} already contains {path.name!r}, which a merge does not write; "
                "use an empty prefix"
            )
    if not any(out_dir.iterdir()):
        out_dir.rmdir()


def metrics_of(plan: MergePlan, stats: EngineStats, seconds: float) -> dict[str, float]:
    """A handful of numbers that fit a termination message."""
    metrics = {
        "tensors": float(stats.tensors),
        "bytes_read": float(stats.bytes_read),
        "bytes_written": float(stats.bytes_written),
        "seconds": round(seconds, 3),
        "peak_inflight_mb": round(stats.peak_inflight_bytes / 2**20, 1),
    }
    for step, (n_from, n_all) in list(stats.fused.items())[:8]:
        metrics[f"fused_fraction.{step}"] = round(n_from / max(1, n_all), 6)
    return metrics


def run(stage: MergeStage, ctx: StageContext) -> StageResult:
    """Validate, merge and publish ``stage``; see the module docstring."""
    t0 = time.monotonic()
    plan = build_plan(stage)
    device = resolve_device(stage.device)
    existing = ctx.storage.committed(stage.output)
    if existing is not None and existing.fingerprint != stage.fingerprint:
        raise StageInputError(
            f"output {stage.output} already holds a committed result with fingerprint {existing.fingerprint}; "
            "outputs are never overwritten, use a new prefix"
        )
    local = ctx.storage.local_path(stage.output)
    staged = local is None
    out_dir = local if local is not None else ctx.workdir / f"merge-{stage.fingerprint}"
    ours = output_names(plan)
    _remove_ours(out_dir, ours, strict=True)  # leftovers of a failed attempt (no manifest: untrusted)
    log.info(
        "%s: merging %d tensors through %d step(s) on %s: %.2f GB in, %.2f GB out",
        stage.name, len(plan.tensors), len(plan.steps), device, plan.bytes_in / 1e9, plan.bytes_out / 1e9,
    )  # fmt: skip

    def progress(done: int, total: int, nbytes: int, total_bytes: int) -> None:
        elapsed = time.monotonic() - t0
        eta = elapsed * (total_bytes - nbytes) / nbytes if nbytes else None
        ctx.reporter.report(
            Progress(
                step=done, total_steps=total, eta_seconds=eta, bytes_done=nbytes, bytes_total=total_bytes
            ),
            force=done == total,
        )

    try:
        stats = execute(
            plan,
            out_dir,
            seed=stage.seed,
            device=device,
            budget_bytes=stage.prefetch_mb * 1024 * 1024,
            progress=progress,
        )
        digests = dict(stats.digests)
        stats.bytes_written += write_metadata(plan, out_dir, digests)
        metrics = metrics_of(plan, stats, time.monotonic() - t0)
        extra = {
            "merge": {
                "steps": [s.dump() for s in stage.steps],
                "configSource": plan.config_source,
                "tokenizerSource": plan.tokenizer_source,
                "vocabRows": plan.vocab_rows,
            }
        }
        ctx.storage.publish_dir(
            out_dir, stage.output, fingerprint=stage.fingerprint, stage=stage.name, metrics=metrics,
            extra=extra, digests=digests,
        )  # fmt: skip
    except BaseException:
        if not staged and not (out_dir / MANIFEST).exists():
            _remove_ours(out_dir, ours, strict=False)
        if staged and ctx.storage.committed(stage.output) is None:
            try:
                ctx.storage.delete_prefix(stage.output)
            except Exception:  # best effort: without a manifest nobody reads it anyway
                log.warning("could not remove partial upload under %s", stage.output)
        raise
    finally:
        if staged and out_dir.exists():
            shutil.rmtree(out_dir, ignore_errors=True)
    log.info(
        "%s: merged %d tensors in %.1f s (%.2f GB read, %.2f GB written)",
        stage.name, stats.tensors, metrics["seconds"], stats.bytes_read / 1e9, stats.bytes_written / 1e9,
    )  # fmt: skip
    return StageResult(kind="Merge", status="Succeeded", fingerprint=stage.fingerprint, output=stage.output,
                       metrics=metrics)  # fmt: skip
