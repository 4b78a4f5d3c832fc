"""``branchmerge-train sft``: one domain branch — full SFT of the student on teacher trajectories.

``run(stage, ctx)`` is called by ``runtime.execute`` (which already returned early if an
output with this fingerprint is committed). It loads the student and the data, resumes from
the newest committed checkpoint, trains, and publishes the model with its manifest last.
Every rank of a torchrun gang runs this same function; rank 0 alone writes the output.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

import torch

from ..runtime import StageContext
from ..stages import SFTStage, StageResult
from ..storage import storage_for
from .attention import choose_implementation
from .checkpoint import CheckpointStore
from .data import load_examples, pack_rows, packing_efficiency
from .model_io import fetch_model, save_hf_dir, saved_dtype
from .train import (
    DistEnv,
    Trainer,
    TrainState,
    barrier,
    init_distributed,
    seed_everything,
    shutdown_distributed,
    zero3_partitioned_loading,
)

log = logging.getLogger("branchmerge.sft")

#: Fault injection for tests: stop (as if killed) after this many optimizer steps.
STOP_AFTER_ENV = "BRANCHMERGE_SFT_STOP_AFTER_STEP"


def run(stage: SFTStage, ctx: StageContext) -> StageResult:
    started = time.time()
    env = init_distributed()
    cfg = stage.training
    seed_everything(cfg.seed)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = fetch_model(stage.student, stage.storage, ctx.cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples, stats = load_examples(
        stage.datasets,
        stage.storage,
        tokenizer,
        ctx.cache_dir(),
        max_length=cfg.max_sequence_length,
        truncation=cfg.truncation,
    )
    lengths = [len(e) for e in examples]
    rows = pack_rows(lengths, cfg.max_sequence_length, cfg.packing)
    stats.rows = len(rows)
    stats.packing_efficiency = packing_efficiency(lengths, rows, cfg.max_sequence_length, cfg.packing)
    if env.is_main:
        log.info("data: %s", json.dumps(stats.metrics()))

    partitioned = zero3_partitioned_loading(cfg, env)  # alive until the engine is built
    model: Any = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=choose_implementation(env.device)
    )
    model.config.use_cache = False
    if partitioned is None:
        model.to(env.device)  # (ZeRO-3's partitioned loading already placed each shard)
    trainer = Trainer(model, examples, rows, cfg, env, mode=cfg.packing)
    del partitioned

    store = CheckpointStore(
        storage_for(stage.checkpoints, stage.storage), stage.checkpoints, stage.fingerprint, ctx.workdir, env
    )
    state = TrainState()
    resumed_from = store.latest()
    if resumed_from is not None:
        state = store.restore(resumed_from, trainer)
    stop_after = ctx.extra.get("stop_after_step") or os.environ.get(STOP_AFTER_ENV)
    state = trainer.fit(
        state,
        report=(lambda p: ctx.reporter.report(p, force=p.step == p.total_steps)) if env.is_main else None,
        on_checkpoint=lambda s: store.save(trainer, s),
        stop_after=int(stop_after) if stop_after else None,
    )

    metrics = _metrics(state, stats.metrics(), trainer, resumed_from)
    metrics["world_size"] = float(env.world_size)  # how many ranks trained (a gang's size × GPUs)
    _publish_output(stage, ctx, env, trainer, tokenizer, model_dir, state, metrics, stats.metrics())
    shutdown_distributed(env)
    if env.is_main:
        log.info("sft %s done in %.0fs: %s", stage.name, time.time() - started, json.dumps(metrics))
    return StageResult(
        kind="SFT", status="Succeeded", fingerprint=stage.fingerprint, output=stage.output, metrics=metrics
    )


def _metrics(
    state: TrainState, data: dict[str, float], trainer: Trainer, resumed_from: int | None
) -> dict[str, float]:
    last = state.history[-1] if state.history else {}
    tail = state.history[-max(1, len(state.history) // 10) :]
    out: dict[str, float] = {
        "steps": state.step,
        "final_loss": float(last.get("loss", float("nan"))),
        "final_loss_avg10pct": sum(h["loss"] for h in tail) / max(1, len(tail)),
        "tokens_seen": state.tokens_seen,
        "target_tokens_seen": state.target_tokens_seen,
        "tokens_per_second": round(state.tokens_seen / max(state.train_seconds, 1e-9), 2),
        "train_seconds": round(state.train_seconds, 2),
        "dropped_samples": data["dropped_samples"],
        "truncated_samples": data["truncated_samples"],
        "examples": data["examples"],
        "rows": data["rows"],
        "packing_efficiency": data["packing_efficiency"],
        "resumed_from_step": float(resumed_from or 0),
    }
    mfus = [h["mfu"] for h in state.history if "mfu" in h]
    if mfus:
        out["mfu"] = round(sum(mfus) / len(mfus), 4)
    return out


def _publish_output(
    stage: SFTStage,
    ctx: StageContext,
    env: DistEnv,
    trainer: Trainer,
    tokenizer: Any,
    model_dir: Any,
    state: TrainState,
    metrics: dict[str, float],
    data: dict[str, float],
) -> None:
    """Rank 0 writes the HF directory and the training log, then publishes (manifest last)."""
    out_dir = ctx.workdir / "output"
    state_dict = None
    if trainer.engine is not None and stage.training.zero_stage == 3:
        # Collective (every rank takes part); the engine wraps CausalLMLoss, whose parameters
        # are the model's under "model." — strip it so the names are the model's own.
        gathered = trainer.engine._zero3_consolidated_16bit_state_dict()
        if gathered is not None:
            dtype = saved_dtype(model_dir)
            state_dict = {k.removeprefix("model."): v.to(dtype) for k, v in gathered.items()}
    if env.is_main:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        if state_dict is not None:
            model: Any = trainer.model
            model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True, max_shard_size="5GB")
            tokenizer.save_pretrained(out_dir)
        else:
            save_hf_dir(trainer.finalize(saved_dtype(model_dir)), tokenizer, out_dir)
        log_doc = {
            "stage": stage.name,
            "fingerprint": stage.fingerprint,
            "training": stage.training.dump(),
            "data": data,
            "metrics": metrics,
            "history": state.history,
        }
        (out_dir / "training_log.json").write_text(json.dumps(log_doc, indent=1))
        ctx.storage.publish_dir(out_dir, stage.output, fingerprint=stage.fingerprint, stage=stage.name, metrics=metrics)
    barrier(env)
