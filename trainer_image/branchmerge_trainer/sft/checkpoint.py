"""Resumable checkpoints in object storage.

Each checkpoint is its own prefix ``<checkpoints>/step-<N>/`` published like a stage output:
files first, ``_MANIFEST.json`` last, carrying the stage fingerprint. A restart resumes from
the newest prefix that is committed *with this stage's fingerprint* (a changed config never
resumes from an incompatible run); a checkpoint cut short by a crash has no manifest and is
ignored. Older checkpoints are pruned only after a newer one is committed.

Every rank uploads the files it wrote (under DDP only rank 0 writes; under DeepSpeed ZeRO
each rank writes its shards), the file lists are gathered, and rank 0 writes the manifest.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..storage import MANIFEST, FileEntry, Manifest, Storage, join, sha256_file
from .train import DistEnv, Trainer, TrainState, barrier

log = logging.getLogger("branchmerge.sft.checkpoint")

_STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_FILE = "model.safetensors"
TRAINER_FILE = "trainer.pt"
STATE_FILE = "state.json"


def step_name(step: int) -> str:
    return f"step-{step:09d}"


class CheckpointStore:
    def __init__(
        self, storage: Storage, prefix: str, fingerprint: str, workdir: Path, env: DistEnv, *, keep: int = 2
    ) -> None:
        self.storage = storage
        self.prefix = prefix.rstrip("/")
        self.fingerprint = fingerprint
        self.workdir = workdir
        self.env = env
        self.keep = max(1, keep)

    # ---------------------------------------------------------------- discovery

    def committed_steps(self) -> list[int]:
        """Steps whose checkpoint is committed with this stage's fingerprint, ascending."""
        steps = set()
        for obj in self.storage.list(self.prefix):
            head, _, tail = obj.key.partition("/")
            m = _STEP_DIR.match(head)
            if m and tail == MANIFEST:
                steps.add(int(m.group(1)))
        return [s for s in sorted(steps) if self.storage.committed(self._uri(s), self.fingerprint) is not None]

    def latest(self) -> int | None:
        steps = self.committed_steps()
        return steps[-1] if steps else None

    def _uri(self, step: int) -> str:
        return join(self.prefix, step_name(step))

    # ---------------------------------------------------------------- save

    def save(self, trainer: Trainer, state: TrainState) -> str:
        """Write this rank's part locally, upload, commit (rank 0), prune older ones."""
        local = self.workdir / "checkpoints" / f"{step_name(state.step)}-rank{self.env.rank}"
        if local.exists():
            shutil.rmtree(local)
        local.mkdir(parents=True)
        if trainer.engine is not None:
            trainer.engine.save_checkpoint(str(local), tag="ds")
        elif self.env.is_main:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in trainer.weights().items()}, str(local / MODEL_FILE))
            torch.save(trainer.state_dict(), local / TRAINER_FILE)
        if self.env.is_main:
            (local / STATE_FILE).write_text(json.dumps(state.to_json()))
        uri = self._uri(state.step)
        self._publish(local, uri, metrics={"step": state.step})
        shutil.rmtree(local, ignore_errors=True)
        if self.env.is_main:
            self.prune()
            log.info("checkpoint committed: %s", uri)
        barrier(self.env)
        return uri

    def _publish(self, local: Path, uri: str, *, metrics: dict[str, float]) -> None:
        entries: list[dict[str, Any]] = []
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            rel = path.relative_to(local).as_posix()
            self.storage.upload_file(path, join(uri, rel))
            entries.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
        if self.env.distributed:
            gathered: list[Any] = [None] * self.env.world_size
            dist.all_gather_object(gathered, entries)
            entries = [e for part in gathered for e in part]
        if self.env.is_main:
            files = sorted({e["path"]: FileEntry(**e) for e in entries}.values(), key=lambda f: f.path)
            manifest = Manifest(fingerprint=self.fingerprint, stage="sft-checkpoint", files=files, metrics=metrics)
            self.storage.write_bytes(join(uri, MANIFEST), manifest.model_dump_json(by_alias=True, indent=1).encode())

    def prune(self) -> None:
        """Keep the newest ``keep`` committed checkpoints; uncommit (manifest first) the rest."""
        steps = self.committed_steps()
        for step in steps[: -self.keep]:
            uri = self._uri(step)
            self.storage.delete_prefix(join(uri, MANIFEST))
            self.storage.delete_prefix(uri)

    # ---------------------------------------------------------------- restore

    def restore(self, step: int, trainer: Trainer) -> TrainState:
        """Load model, optimizer, schedule and RNG from a committed checkpoint."""
        local, _ = self.storage.materialize(self._uri(step), self.workdir / "cache" / "checkpoints")
        if trainer.engine is not None:
            trainer.engine.load_checkpoint(str(local), tag="ds")
        else:
            from safetensors.torch import load_file

            trainer.load_weights(load_file(str(local / MODEL_FILE), device=str(trainer.env.device)))
            trainer.load_state_dict(torch.load(local / TRAINER_FILE, map_location=trainer.env.device, weights_only=True))
        state = TrainState.from_json(json.loads((local / STATE_FILE).read_text()))
        log.info("resumed from %s (step %d)", self._uri(step), state.step)
        return state
