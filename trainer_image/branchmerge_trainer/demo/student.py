"""The demo's student: a tiny Qwen2 with a locally trained tokenizer and a brief general
pre-training, so that it starts weak but not random (it writes fluent domain text and knows
the chat format, but was never shown worked solutions).

Pre-training here is plain next-token prediction on packed rows — not the SFT stage, whose
loss covers assistant turns only — and takes about a minute on two CPU cores.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..tiny import build_model, build_tokenizer


@dataclass(frozen=True)
class StudentConfig:
    vocab_size: int = 768
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 250
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: (step, total steps, loss, tokens per second)
ProgressFn = Callable[[int, int, float, float], None]


def pack_rows(docs: Sequence[list[int]], seq_len: int, eos: int, seed: int) -> list[list[int]]:
    """Shuffle documents, join them with EOS and cut the stream into full rows (the tail is
    dropped): the standard pre-training layout, no padding."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    for i in order:
        stream.extend(docs[i])
        stream.append(eos)
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def lr_at(step: int, cfg: StudentConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def pretrain(model: Any, rows: list[list[int]], cfg: StudentConfig, progress: ProgressFn | None = None) -> float:
    """Train ``model`` on random batches of ``rows`` for ``cfg.steps`` steps; returns the last loss."""
    import torch

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    loss_value = float("nan")
    start = time.monotonic()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = torch.tensor(rng.sample(rows, min(cfg.batch_size, len(rows))))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=batch, labels=batch, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(out.loss.detach())
        if progress is not None:
            elapsed = time.monotonic() - start
            progress(step + 1, cfg.steps, loss_value, (step + 1) * batch.numel() / max(elapsed, 1e-9))
    model.eval()
    return loss_value


def build_student(
    out_dir: Path,
    tokenizer_texts: Sequence[str],
    pretrain_texts: Sequence[str],
    pretrain_chats: Sequence[list[dict[str, str]]],
    cfg: StudentConfig,
    progress: ProgressFn | None = None,
) -> dict[str, float]:
    """Train the tokenizer, build the model, pre-train it and save both to ``out_dir``."""
    import torch

    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(tokenizer_texts, vocab_size=cfg.vocab_size)
    model = build_model(
        tokenizer,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=max(1024, cfg.seq_len),
        seed=cfg.seed,
    )
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in pretrain_texts]
    for chat in pretrain_chats:
        docs.append(list(tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]))
    rows = pack_rows(docs, cfg.seq_len, tokenizer.pad_token_id, cfg.seed)
    if not rows:
        raise ValueError("pre-training corpus is shorter than one row; add text or lower seq_len")
    loss = pretrain(model, rows, cfg, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    params = sum(p.numel() for p in model.parameters())
    return {"pretrain_loss": loss, "parameters": float(params), "pretrain_rows": float(len(rows))}
