"""The SFT training loop: one readable loop driven by the typed ``TrainingConfig``.

Per optimizer step: take the step's rows (``RowSchedule``), give each rank its share in
micro-batches, run forward/backward on each micro-batch (gradient sync only on the last),
clip, step AdamW and the schedule, log. The loss is the mean over every target token of the
*global* batch (not a mean of micro-batch means), so packing mode, micro-batch size,
accumulation and world size never change what is optimised. Every rank holds the whole
tokenised dataset, so each knows the global target count without communicating.

Distribution: torchrun's environment → torch.distributed (gloo on CPU, nccl on GPU) and DDP.
With ``zeroStage >= 2`` on GPU and DeepSpeed installed, the model is wrapped by a DeepSpeed
engine instead, from a config generated here (``deepspeed_config``); without DeepSpeed the
same run falls back to DDP and says so.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..stages import Progress, TrainingConfig
from .attention import varlen_kwargs
from .data import Batch, Example, PackingMode, RowSchedule, collate, split_micro_batches

log = logging.getLogger("branchmerge.sft.train")

#: Above this many logit elements per micro-batch the loss is computed in checkpointed
#: chunks, so [tokens × vocab] logits are never all alive at once (16k tokens × 152k vocab
#: would be ~10 GB in fp32).
_LOGIT_CHUNK_ELEMENTS = 1 << 26

#: Dense bf16 peak FLOP/s of common accelerators, for MFU (override: BRANCHMERGE_PEAK_FLOPS).
_GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


class SimulatedCrash(RuntimeError):
    """Raised by the fault-injection hook (tests kill a run mid-way with it)."""


# --------------------------------------------------------------------------- environment


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistEnv:
    """Read torchrun's environment; start the process group when there is more than one rank."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device)


def shutdown_distributed(env: DistEnv) -> None:
    """Leave the process group after the last collective (the stage's final barrier). Left to
    interpreter exit, its communication threads can be torn down while still joinable and
    abort the process (SIGABRT after a successful run: seen with ZeRO-3 on gloo), which fails
    the pod."""
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.barrier()


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe and probe()) or (amx and amx()))


def uses_bf16(precision: str, device: torch.device) -> bool:
    """bf16 was asked for and the hardware has bf16 arithmetic (else the run is fp32)."""
    return precision == "bf16" and bf16_supported(device)


def accumulation_steps(cfg: TrainingConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank; the global batch must split evenly."""
    per_step = cfg.micro_batch_size * world_size
    if cfg.global_batch_size % per_step:
        from ..runtime import StageInputError

        raise StageInputError(
            f"training.globalBatchSize={cfg.global_batch_size} is not a multiple of microBatchSize "
            f"({cfg.micro_batch_size}) × world size ({world_size}); choose e.g. "
            f"{max(per_step, cfg.global_batch_size // per_step * per_step)}"
        )
    return cfg.global_batch_size // per_step


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast over fp32 master weights where the hardware has bf16 arithmetic."""
    if uses_bf16(precision, device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- loss


def _has_logit_transform(config: Any) -> bool:
    """Models that scale or soft-cap logits after the head (Gemma 2, Cohere, Granite …) need
    their own forward; for the rest we apply the head ourselves, to target positions only."""
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return True
    return False


class CausalLMLoss(nn.Module):
    """Summed next-token cross-entropy over a batch's target positions.

    The LM head runs only on positions whose next token is trained (prompt logits are never
    formed), in checkpointed chunks when the logits would be large. Returns an fp32 sum; the
    caller divides by the global target count.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.own_head = not _has_logit_transform(model.config)

    def token_losses(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        target_index: torch.Tensor,
        target_ids: torch.Tensor,
    ) -> torch.Tensor:
        kwargs = varlen_kwargs(cu_seqlens, max_seqlen)
        model: Any = self.model
        if not self.own_head:
            out = model(
                input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=target_index, **kwargs
            )
            return F.cross_entropy(out.logits[0].float(), target_ids, reduction="none")
        hidden = model.get_decoder()(
            input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs
        ).last_hidden_state[0]
        selected = hidden.index_select(0, target_index)
        head = model.get_output_embeddings()
        rows = max(1, _LOGIT_CHUNK_ELEMENTS // head.weight.shape[0])
        if selected.shape[0] <= rows:
            return _head_loss(head, selected, target_ids)
        from torch.utils.checkpoint import checkpoint

        parts = [
            checkpoint(_head_loss, head, selected[i : i + rows], target_ids[i : i + rows], use_reentrant=False)
            for i in range(0, selected.shape[0], rows)
        ]
        return torch.cat(parts)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        target_index: torch.Tensor,
        target_ids: torch.Tensor,
    ) -> torch.Tensor:
        return self.token_losses(input_ids, position_ids, cu_seqlens, max_seqlen, target_index, target_ids).sum()


def _head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def batch_args(batch: Batch) -> tuple[Any, ...]:
    return (
        batch.input_ids,
        batch.position_ids,
        batch.cu_seqlens,
        batch.max_seqlen,
        batch.target_index,
        batch.target_ids,
    )


# --------------------------------------------------------------------------- optimisation


def build_optimizer(params: Sequence[torch.Tensor], cfg: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-D tensors) are not decayed, as in HF Trainer.
    A ZeRO-3 partitioned parameter is a flat shard: its true shape is ``ds_shape``."""

    def ndim(p: torch.Tensor) -> int:
        return len(getattr(p, "ds_shape", p.shape))

    decay = [p for p in params if p.requires_grad and ndim(p) >= 2]
    no_decay = [p for p in params if p.requires_grad and ndim(p) < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = all(p.dtype in (torch.float32, torch.bfloat16) for p in decay + no_decay)
    return torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.adam_betas[0], cfg.adam_betas[1]), eps=cfg.adam_epsilon, fused=fused
    )


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based): linear
    warmup from 0, then constant, cosine to 0, or linear to 0 — the HF Trainer formulas the
    paper's LLaMA-Factory runs used, so curves are comparable step for step."""
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total_steps: int) -> Any:
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=warmup, total=total_steps, schedule=cfg.schedule)
    )


# --------------------------------------------------------------------------- FLOPs


@dataclass(frozen=True)
class FlopModel:
    """Model FLOPs of one training token: 6 × matmul parameters, plus causal attention."""

    matmul_params: int
    layers: int
    attn_width: int

    @classmethod
    def of(cls, model: nn.Module) -> FlopModel:
        # Under ZeRO-3's partitioned loading a weight holds only this rank's shard; ds_numel is its full size.
        params = sum(
            int(getattr(m.weight, "ds_numel", m.weight.numel())) for m in model.modules() if isinstance(m, nn.Linear)
        )
        cfg: Any = getattr(model, "config", None)
        layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
        heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
        head_dim = getattr(cfg, "head_dim", None) or (int(getattr(cfg, "hidden_size", 0)) // max(1, heads))
        return cls(params, layers, heads * int(head_dim))

    def flops(self, tokens: int, seg_lengths: Sequence[int]) -> float:
        """6·N·tokens + 6·layers·width·Σ s² (QKᵀ and AV, causal half, forward + backward)."""
        return 6.0 * self.matmul_params * tokens + 6.0 * self.layers * self.attn_width * float(
            sum(s * s for s in seg_lengths)
        )


def peak_flops(device: torch.device) -> float | None:
    env = os.environ.get("BRANCHMERGE_PEAK_FLOPS")
    if env:
        return float(env)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _GPU_PEAK_BF16.items():
            if key in name:
                return value
    return None


# --------------------------------------------------------------------------- state


@dataclass
class TrainState:
    """Everything about progress that a checkpoint restores besides tensors."""

    step: int = 0
    tokens_seen: int = 0
    target_tokens_seen: int = 0
    train_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "target_tokens_seen": self.target_tokens_seen,
            "train_seconds": self.train_seconds,
            "history": self.history,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        return cls(**data)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- DeepSpeed


#: Lets ZeRO run on CPU (DeepSpeed's CPU accelerator over gloo) so the DeepSpeed path can be
#: tested on machines without GPUs; never needed in production.
DEEPSPEED_CPU_ENV = "BRANCHMERGE_DEEPSPEED_ON_CPU"


def deepspeed_wanted(cfg: TrainingConfig, env: DistEnv) -> bool:
    """ZeRO ≥ 2 on GPU when DeepSpeed is installed; otherwise DDP (logged)."""
    on_cpu = os.environ.get(DEEPSPEED_CPU_ENV) == "1"
    if cfg.zero_stage < 2 or (env.device.type != "cuda" and not on_cpu):
        return False
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        log.warning("zeroStage=%d asks for DeepSpeed, which is not installed; using DDP", cfg.zero_stage)
        return False
    return True


def zero3_partitioned_loading(cfg: TrainingConfig, env: DistEnv) -> Any:
    """Under ZeRO-3 with DeepSpeed: an ``HfDeepSpeedConfig`` that makes ``from_pretrained``
    build the model already partitioned (``deepspeed.zero.Init``), so each rank holds 1/world
    of the weights instead of all of them (a 32B student is 64 GB in bf16 — per rank, without
    this). The caller keeps the returned object alive until the engine exists; None otherwise."""
    if cfg.zero_stage != 3 or not deepspeed_wanted(cfg, env):
        return None
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    # DeepSpeed's config reads the world size from its own comm layer: attach it to the
    # process group torch.distributed already has (else it sees a world of 1).
    deepspeed.init_distributed()
    accumulation = accumulation_steps(cfg, env.world_size)
    bf16 = uses_bf16(cfg.precision, env.device)
    if env.is_main:
        log.info("ZeRO-3: the student is loaded partitioned across %d ranks (zero.Init)", env.world_size)
    return HfDeepSpeedConfig(deepspeed_config(cfg, world_size=env.world_size, accumulation=accumulation, bf16=bf16))


def deepspeed_config(cfg: TrainingConfig, *, world_size: int, accumulation: int, bf16: bool) -> dict[str, Any]:
    """A DeepSpeed config equivalent to the stage config. We feed one flattened micro-batch
    per forward, so DeepSpeed's micro-batch is 1 and its accumulation is ours; optimizer and
    schedule are ours too (passed to ``deepspeed.initialize``)."""
    zero: dict[str, Any] = {
        "stage": cfg.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
    }
    if cfg.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=5e8,
            stage3_param_persistence_threshold=1e6,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    else:
        zero["allgather_bucket_size"] = 5e8
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": accumulation * world_size,
        "gradient_clipping": cfg.max_grad_norm,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


# --------------------------------------------------------------------------- the loop


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    targets: int
    seconds: float
    flops: float


class Trainer:
    """Owns the wrapped model, optimizer and schedule; ``fit`` runs the loop."""

    def __init__(
        self,
        model: nn.Module,
        examples: Sequence[Example],
        rows: Sequence[Sequence[int]],
        cfg: TrainingConfig,
        env: DistEnv,
        *,
        mode: PackingMode,
    ) -> None:
        self.cfg = cfg
        self.env = env
        self.mode = mode
        self.examples = examples
        self.rows = rows
        self.accumulation = accumulation_steps(cfg, env.world_size)
        self.schedule = RowSchedule(len(rows), cfg.global_batch_size, cfg.seed)
        steps = math.ceil(cfg.epochs * len(rows) / cfg.global_batch_size)
        self.total_steps = max(1, min(steps, cfg.max_steps) if cfg.max_steps else steps)
        row_targets = []
        for row in rows:
            row_targets.append(sum(int(examples[i].loss_mask[1:].sum()) for i in row))
        self._row_targets = row_targets
        self._row_tokens = [sum(len(examples[i]) for i in row) for row in rows]

        self.model = model
        self.flop_model = FlopModel.of(model)
        self.peak = peak_flops(env.device)
        if cfg.gradient_checkpointing:
            model_any: Any = model
            model_any.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.loss_module = CausalLMLoss(model)
        self.bf16 = uses_bf16(cfg.precision, env.device)
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # bf16 on CPU: autocast re-casts weights and activations around every op, which costs
        # more than bf16 saves there (measured: autocast ≈ fp32 speed, pure bf16 ≈ 1.4–1.5×).
        # So the model computes in bf16 and fp32 master weights live in the optimizer — the
        # scheme DeepSpeed and Megatron use on GPUs. On GPUs we keep autocast (casts are cheap
        # next to tensor-core matmuls) or DeepSpeed's own bf16 handling.
        self.engine: Any = None
        self.master: list[torch.Tensor] | None = None
        use_deepspeed = deepspeed_wanted(cfg, env)
        if self.bf16 and env.device.type == "cpu" and not use_deepspeed:
            self.master = [p.detach().clone().float().requires_grad_(True) for _, p in self.named_params]
            model.to(torch.bfloat16)
            self.optimizer = build_optimizer(self.master, cfg)
        else:
            self.optimizer = build_optimizer([p for _, p in self.named_params], cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self.wrapped: nn.Module = self.loss_module
        if self.master is not None:
            pass  # gradients are all-reduced on the fp32 master copies (see _reduce_master_grads)
        elif use_deepspeed:
            import deepspeed

            ds_config = deepspeed_config(
                cfg, world_size=env.world_size, accumulation=self.accumulation, bf16=self.bf16
            )
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.loss_module, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=ds_config
            )
            self.wrapped = self.engine
        elif env.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.wrapped = DistributedDataParallel(
                self.loss_module, device_ids=[env.local_rank] if env.device.type == "cuda" else None
            )

    # ---------------------------------------------------------------- weights

    def weights(self) -> dict[str, torch.Tensor]:
        """Full-precision weights by parameter name (the master copies when there are any)."""
        if self.master is not None:
            return {n: m.detach() for (n, _), m in zip(self.named_params, self.master, strict=True)}
        return {n: p.detach() for n, p in self.named_params}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, (name, p) in enumerate(self.named_params):
                p.copy_(weights[name])
                if self.master is not None:
                    self.master[i].copy_(weights[name])

    def finalize(self, dtype: torch.dtype) -> nn.Module:
        """The model in ``dtype`` carrying the full-precision weights, for saving."""
        weights = self.weights()
        self.model.to(dtype)
        self.load_weights(weights)
        return self.model

    def _accumulate_master_grads(self) -> None:
        assert self.master is not None
        for (_, p), m in zip(self.named_params, self.master, strict=True):
            if p.grad is None:
                continue
            if m.grad is None:
                m.grad = p.grad.float()
            else:
                m.grad.add_(p.grad)
            p.grad = None

    def _reduce_master_grads(self) -> None:
        assert self.master is not None
        grads = [m.grad for m in self.master if m.grad is not None]
        if not self.env.distributed or not grads:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(synced)

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])

    # ---------------------------------------------------------------- steps

    def _micro_batches(self, step: int) -> tuple[list[Batch], int]:
        rows = self.schedule.step_rows(step)
        targets = sum(self._row_targets[r] for r in rows)
        mine = split_micro_batches(rows, self.env.rank, self.env.world_size, self.cfg.micro_batch_size)
        batches = [collate(self.examples, [self.rows[r] for r in mb], self.mode) for mb in mine]
        return batches, targets

    def train_step(self, step: int) -> StepStats:
        start = time.perf_counter()
        lr = float(self.optimizer.param_groups[0]["lr"])  # the rate this step applies
        batches, global_targets = self._micro_batches(step)
        world = self.env.world_size
        # DDP and DeepSpeed average gradients over ranks (DeepSpeed also over accumulation):
        # undo that so the gradient is d(sum of losses)/d(theta) / global target count.
        scale = world / max(1, global_targets)
        if self.engine is not None:
            scale *= self.accumulation
        if self.master is not None:  # we sum master gradients over ranks ourselves
            scale = 1.0 / max(1, global_targets)
        self.wrapped.train()
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
            self.loss_module.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        tokens = 0
        flops = 0.0
        for i, batch in enumerate(batches):
            batch.to(self.env.device)
            last = i == len(batches) - 1
            no_sync: Any = getattr(self.wrapped, "no_sync", None)
            sync_ctx = no_sync() if (no_sync is not None and not last and self.engine is None) else contextlib.nullcontext()
            with sync_ctx:
                with autocast(self.cfg.precision if self.master is None else "fp32", self.env.device):
                    ce = self.wrapped(*batch_args(batch))
                if self.engine is not None:
                    self.engine.backward(ce * scale)
                    self.engine.step()
                else:
                    (ce * scale).backward()
            if self.master is not None:
                self._accumulate_master_grads()
            loss_sum += ce.detach().double()
            tokens += batch.num_tokens
            flops += self.flop_model.flops(batch.num_tokens, batch.seg_lengths)
        totals = torch.tensor([loss_sum.item(), float(tokens), flops], dtype=torch.float64, device=self.env.device)
        if self.env.distributed:
            dist.all_reduce(totals)
        if self.engine is not None:
            grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        else:
            if self.master is not None:
                self._reduce_master_grads()
                params = [m for m in self.master if m.grad is not None]
            else:
                params = [p for p in self.loss_module.parameters() if p.grad is not None]
            max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            self.optimizer.step()
            self.scheduler.step()
            if self.master is not None:
                self.optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    torch._foreach_copy_([p for _, p in self.named_params], self.master)
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)
        return StepStats(
            loss=float(totals[0]) / max(1, global_targets),
            grad_norm=grad_norm,
            lr=lr,
            tokens=int(totals[1]),
            targets=global_targets,
            seconds=time.perf_counter() - start,
            flops=float(totals[2]),
        )

    def fit(
        self,
        state: TrainState,
        *,
        report: Callable[[Progress], None] | None = None,
        on_checkpoint: Callable[[TrainState], object] | None = None,
        stop_after: int | None = None,
    ) -> TrainState:
        """Train from ``state.step`` to the end; checkpoint every ``checkpointInterval`` steps.

        ``stop_after`` is fault injection for tests: raise ``SimulatedCrash`` once that many
        steps are done (after their checkpoint), as if the pod had been killed."""
        cfg = self.cfg
        for step in range(state.step, self.total_steps):
            s = self.train_step(step)
            state.step = step + 1
            state.tokens_seen += s.tokens
            state.target_tokens_seen += s.targets
            state.train_seconds += s.seconds
            record = {
                "step": state.step,
                "loss": round(s.loss, 6),
                "lr": s.lr,
                "grad_norm": round(s.grad_norm, 6),
                "tokens": s.tokens,
                "tokens_per_second": round(s.tokens / max(s.seconds, 1e-9), 2),
            }
            if self.peak:
                record["mfu"] = round(s.flops / max(s.seconds, 1e-9) / self.peak / self.env.world_size, 4)
            state.history.append(record)
            if self.env.is_main and (state.step % cfg.logging_interval == 0 or state.step == self.total_steps):
                log.info("step %d/%d %s", state.step, self.total_steps, _fmt(record))
            if report is not None:
                remaining = self.total_steps - state.step
                per_step = state.train_seconds / max(1, len(state.history))
                report(
                    Progress(
                        step=state.step,
                        total_steps=self.total_steps,
                        loss=s.loss,
                        tokens_per_second=record["tokens_per_second"],
                        eta_seconds=round(remaining * per_step, 1),
                        epoch=round(self.schedule.epoch_at(state.step), 4),
                    )
                )
            if on_checkpoint is not None and state.step % cfg.checkpoint_interval == 0 and state.step < self.total_steps:
                on_checkpoint(state)
            if stop_after is not None and state.step >= stop_after and state.step < self.total_steps:
                raise SimulatedCrash(f"fault injection: stopped after step {state.step}")
        return state


def _fmt(record: dict[str, float]) -> str:
    return " ".join(f"{k}={v}" for k, v in record.items() if k != "step")

