"""Shared builders for the SFT tests (imported by the test_sft_* modules; holds no tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from branchmerge_trainer.stages import SFTStage

_TOKENIZER_CACHE: dict[str, Any] = {}


def chats(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Deterministic arithmetic chats of mixed lengths, with reasoning in <think>."""
    out: list[dict[str, Any]] = []
    for i in range(n):
        a, b = (i * 7 + seed) % 97, (i * 13 + seed) % 89
        steps = " ".join(f"{a}+{k}={a + k}." for k in range(i % 5 + 1))
        if i % 3 == 0:
            out.append({"prompt": f"What is {a} + {b}?", "response": f"<think>{steps}</think>The answer is {a + b}."})
        else:
            msgs = [{"role": "user", "content": f"Add {a} and {b}."},
                    {"role": "assistant", "content": f"<think>{steps} so {a + b}</think>{a + b}"}]
            if i % 3 == 2:
                msgs.insert(0, {"role": "system", "content": "Be brief."})
            out.append({"messages": msgs})
    return out


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_model_dir(root: Path, **kw: Any) -> Path:
    """A 2-layer, 32-wide Qwen2 with a 512-token BPE tokenizer (~50k parameters)."""
    from branchmerge_trainer.tiny import build_model, build_tokenizer, sample_corpus

    out = root / "student"
    if (out / "config.json").exists():
        return out
    if "tok" not in _TOKENIZER_CACHE:
        _TOKENIZER_CACHE["tok"] = build_tokenizer(sample_corpus(), vocab_size=512)
    tok = _TOKENIZER_CACHE["tok"]
    params = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64}
    params.update(kw)
    model = build_model(tok, **params)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def sft_stage(root: Path, student: str, data: list[str], *, out: str | None = None,
              ckpt: str | None = None, **training: Any) -> SFTStage:
    t: dict[str, Any] = {
        "epochs": 1, "globalBatchSize": 4, "microBatchSize": 2, "maxSequenceLength": 128,
        "learningRate": 1e-3, "packing": "neat", "gradientCheckpointing": False, "zeroStage": 0,
        "checkpointInterval": 1000, "precision": "fp32", "warmupRatio": 0.1,
    }
    t.update(training)
    return SFTStage.model_validate({
        "name": "branch-test",
        "fingerprint": "fp-" + str(abs(hash(json.dumps(t, sort_keys=True))) % 10**8),
        "output": out or f"file://{root}/out",
        "checkpoints": ckpt or f"file://{root}/ckpt",
        "student": {"uri": student},
        "datasets": [{"uri": d} for d in data],
        "training": t,
        "resultPath": str(root / "result.json"),
    })
