"""Random Qwen2-shaped checkpoint families (a base plus fine-tunes = base + small deltas),
written tensor by tensor, for tests and benchmarks of the merge engine.

Generating a 1 GB checkpoint through ``transformers`` would hold the whole model in memory
and take minutes; this writes the planned safetensors shards directly with one tensor in
memory, and the result loads in ``transformers`` like any Qwen2 checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .safetensors_io import CODE_OF, OutTensor, index_json, plan_shards


def qwen2_config(
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    vocab: int,
    heads: int,
    kv_heads: int,
    tie: bool = False,
    dtype: str = "bfloat16",
) -> dict[str, Any]:
    """A config.json that transformers accepts for Qwen2ForCausalLM."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie,
        "hidden_act": "silu",
        "torch_dtype": dtype,
    }


def qwen2_shapes(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a Qwen2ForCausalLM, in the order transformers saves them."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, h)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (v, h)))
    return out


def write_family(
    root: Path,
    names: Sequence[str],
    config: dict[str, Any],
    *,
    base: str | None = None,
    delta_std: float = 1e-3,
    weight_std: float = 0.02,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = 5 * 1024**3,
    seed: int = 0,
    extra_files: dict[str, bytes] | None = None,
) -> dict[str, Path]:
    """Write ``base`` (if given) and each of ``names`` as a fine-tune of it (or of a shared
    hidden base) under ``root/<name>``; norms are 1 + noise, biases and weights Gaussian."""
    shapes = qwen2_shapes(config)
    code = CODE_OF[dtype]
    layout = plan_shards([OutTensor(n, code, s) for n, s in shapes], shard_bytes)
    models = ([base] if base else []) + list(names)
    dirs = {m: root / m for m in models}
    files: dict[str, dict[str, int]] = {}
    for m, d in dirs.items():
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config, indent=2))
        for rel, data in (extra_files or {}).items():
            (d / rel).write_bytes(data)
        if len(layout) > 1:
            (d / "model.safetensors.index.json").write_bytes(index_json(layout))
        files[m] = {}
    gen = torch.Generator().manual_seed(seed)
    fds: dict[str, int] = {}
    try:
        for shard in layout:
            for m, d in dirs.items():
                fds[m] = os.open(d / shard.filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.write(fds[m], shard.header)
            for t in shard.tensors:
                w = torch.randn(t.shape, generator=gen) * weight_std
                if t.name.endswith("norm.weight"):
                    w += 1.0
                for m in models:
                    x = w if m == base else w + torch.randn(t.shape, generator=gen) * delta_std
                    view = x.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy().data
                    while view.nbytes:
                        view = view[os.write(fds[m], view) :]
            for m in models:
                os.close(fds.pop(m))
    finally:
        for fd in fds.values():
            os.close(fd)
    return dirs
