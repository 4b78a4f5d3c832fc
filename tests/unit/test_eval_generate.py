"""Generation backends: our continuous-batching engine against transformers' generate.

Greedy outputs must be identical in fp32 (batched transformers, one-at-a-time transformers
and our engine with slots refilled mid-run), with response lengths varied by a logits hook
that forces EOS after a per-prompt number of tokens — the same hook in every backend.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from branchmerge_trainer.evaluate.generate import (
    ContinuousBatchingGenerator,
    GenerationOutput,
    GenerationRequest,
    TransformersGenerator,
    UnsupportedModel,
    chat_prompt,
    decode,
    eos_token_ids,
    load,
)
from branchmerge_trainer.tiny import build_model, build_tokenizer, sample_corpus


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one torch thread avoids OpenMP threads
    spinning against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tokenizer(sample_corpus())


@pytest.fixture(scope="module")
def model(tok: Any) -> Any:
    return build_model(tok, hidden_size=64, num_layers=2, seed=1).eval()


def _prompts(n: int, seed: int = 0) -> list[tuple[int, ...]]:
    rnd = random.Random(seed)
    return [tuple(rnd.randrange(5, 500) for _ in range(rnd.randrange(2, 40))) for _ in range(n)]


def _eos_hook(eos: int, lengths: dict[tuple[int, ...], int]) -> Any:
    def hook(prompts: Sequence[Sequence[int]], counts: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        for j, (p, c) in enumerate(zip(prompts, counts, strict=True)):
            if c >= lengths[tuple(p)]:
                logits[j] = -1e9
                logits[j, eos] = 0.0
        return logits

    return hook


def _engines(model: Any, tok: Any, hook: Any = None, **kw: Any) -> dict[str, Any]:
    ids = {"eos_token_ids": [tok.eos_token_id], "pad_token_id": tok.pad_token_id, "logits_hook": hook}
    return {
        "naive": TransformersGenerator(model, batch_size=1, **ids),
        "batched": TransformersGenerator(model, batch_size=8, **ids),
        "ours": ContinuousBatchingGenerator(model, max_batch=5, **ids, **kw),
    }


def test_greedy_outputs_identical_to_transformers(model: Any, tok: Any) -> None:
    prompts = _prompts(12)
    prompts += prompts[:3]  # repeated prompts share one prefill in our engine
    rnd = random.Random(1)
    lengths = {p: rnd.choice([0, 1, 3, 7, 12, 100]) for p in prompts}  # 100 > limit: runs to the end
    requests = [GenerationRequest(p, 20) for p in prompts]
    hook = _eos_hook(tok.eos_token_id, lengths)
    # headroom 4 forces the cache to compact and grow while rows come and go
    outs = {name: g.generate(requests) for name, g in _engines(model, tok, hook, headroom=4).items()}
    assert outs["ours"] == outs["batched"] == outs["naive"]
    # attention per group of 2 slots, slots re-sorted by age at every step
    grouped = ContinuousBatchingGenerator(
        model, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, logits_hook=hook,
        max_batch=6, attention_group=2, regroup_every=1,
    ).generate(requests)  # fmt: skip
    assert grouped == outs["naive"]
    for p, o in zip(prompts, outs["ours"], strict=True):
        assert len(o.token_ids) == min(lengths[p], 20)
        assert o.finish_reason == ("length" if lengths[p] >= 20 else "stop")


@pytest.mark.parametrize("linear", ["torch", "onednn"])
def test_both_gemm_paths_match_transformers(model: Any, tok: Any, linear: str) -> None:
    """F.linear (MKL) and oneDNN's linear sum in different orders; greedy outputs agree."""
    prompts = _prompts(10, seed=5)
    rnd = random.Random(2)
    lengths = {p: rnd.choice([1, 4, 9, 100]) for p in prompts}
    requests = [GenerationRequest(p, 16) for p in prompts]
    hook = _eos_hook(tok.eos_token_id, lengths)
    engines = _engines(model, tok, hook, linear=linear)
    assert engines["ours"].linear_backend == linear
    assert engines["ours"].generate(requests) == engines["naive"].generate(requests)


def test_gemm_path_is_picked_only_for_fp32_cpu(model: Any) -> None:
    from branchmerge_trainer.evaluate.generate import _pick_linear

    assert _pick_linear(model, torch.device("cpu"), torch.bfloat16, 8)[1] == "torch"
    assert _pick_linear(model, torch.device("cpu"), torch.float32, 8)[1] in {"torch", "onednn"}


def test_without_a_hook_the_model_decides_alone(model: Any, tok: Any) -> None:
    requests = [GenerationRequest(p, 12) for p in _prompts(6, seed=3)]
    outs = {name: g.generate(requests) for name, g in _engines(model, tok).items()}
    assert outs["ours"] == outs["batched"] == outs["naive"]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_other_architectures_match_transformers(arch: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    cls, model_cls, extra = {
        "llama": (LlamaConfig, LlamaForCausalLM, {}),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    }[arch]
    config = cls(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=2, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = model_cls(config).eval()
    requests = [GenerationRequest(p, 10) for p in _prompts(5, seed=4)]
    ours = ContinuousBatchingGenerator(model, eos_token_ids=[2], pad_token_id=0, max_batch=3).generate(requests)
    ref = TransformersGenerator(model, eos_token_ids=[2], pad_token_id=0, batch_size=1).generate(requests)
    assert ours == ref


def test_unsupported_architecture_is_refused() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=1))
    with pytest.raises(UnsupportedModel, match="gpt2"):
        ContinuousBatchingGenerator(model, eos_token_ids=[1], pad_token_id=0)


def test_sampling_is_reproducible_and_independent_of_batch_mates(model: Any, tok: Any) -> None:
    prompts = _prompts(5, seed=5) * 2  # samples of one problem: shared prefill, own RNG each
    requests = [GenerationRequest(p, 12, temperature=0.9, top_p=0.9, seed=100 + i) for i, p in enumerate(prompts)]
    ids = {"eos_token_ids": [tok.eos_token_id], "pad_token_id": tok.pad_token_id}
    a = ContinuousBatchingGenerator(model, max_batch=2, **ids).generate(requests)
    b = ContinuousBatchingGenerator(model, max_batch=10, **ids).generate(requests)
    c = ContinuousBatchingGenerator(model, max_batch=4, **ids).generate(requests[::-1])[::-1]
    assert a == b == c
    assert a[:5] != a[5:]  # same prompt, different seeds
    reseeded = [GenerationRequest(r.prompt_ids, 12, 0.9, 0.9, seed=r.seed + 1) for r in requests]
    assert ContinuousBatchingGenerator(model, max_batch=4, **ids).generate(reseeded) != a


def test_tiny_top_p_is_greedy(model: Any, tok: Any) -> None:
    prompts = _prompts(4, seed=6)
    ids = {"eos_token_ids": [tok.eos_token_id], "pad_token_id": tok.pad_token_id}
    engine = ContinuousBatchingGenerator(model, max_batch=4, **ids)
    greedy = engine.generate([GenerationRequest(p, 8) for p in prompts])
    nucleus = engine.generate([GenerationRequest(p, 8, temperature=1.0, top_p=1e-6, seed=i) for i, p in enumerate(prompts)])
    assert greedy == nucleus


def test_transformers_sampling_is_reproducible(model: Any, tok: Any) -> None:
    requests = [GenerationRequest(p, 8, temperature=0.8, top_p=0.95, seed=3) for p in _prompts(4, seed=7)]
    gen = TransformersGenerator(model, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, batch_size=4)
    assert gen.generate(requests) == gen.generate(requests)


def test_transformers_ignores_the_checkpoints_sampling_defaults(model: Any, tok: Any) -> None:
    """A checkpoint's generation_config.json (top_k, repetition penalty) must not change the
    benchmark's protocol (temperature + top-p only)."""
    from transformers import GenerationConfig

    requests = [GenerationRequest(p, 8, temperature=1.0, top_p=0.95, seed=11) for p in _prompts(4, seed=9)]
    gen = TransformersGenerator(model, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, batch_size=4)
    clean = gen.generate(requests)
    original = model.generation_config
    model.generation_config = GenerationConfig(do_sample=True, top_k=1, repetition_penalty=3.0, min_p=0.5)
    try:
        assert gen.generate(requests) == clean
    finally:
        model.generation_config = original


def test_responses_stop_at_the_context_limit(model: Any, tok: Any) -> None:
    limit = model.config.max_position_embeddings
    requests = [GenerationRequest(tuple([7] * (limit - 3)), 50), GenerationRequest(tuple([7] * limit), 50)]
    outs = ContinuousBatchingGenerator(model, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id).generate(requests)
    assert [len(o.token_ids) for o in outs] == [3, 0]
    assert all(o.finish_reason == "length" for o in outs)


def test_on_done_fires_once_per_request(model: Any, tok: Any) -> None:
    requests = [GenerationRequest(p, 6) for p in _prompts(7, seed=8)]
    seen: list[int] = []

    def done(i: int, out: GenerationOutput) -> None:
        seen.append(i)

    outs = ContinuousBatchingGenerator(
        model, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, max_batch=3
    ).generate(requests, on_done=done)
    assert sorted(seen) == list(range(7)) and len(outs) == 7


def test_eos_tokens_from_tokenizer_and_generation_config(tok: Any, tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, tok.eos_token_id]}))
    assert eos_token_ids(tok, tmp_path) == sorted({0, tok.eos_token_id})


def test_chat_prompt_and_decode_keep_think_markers(tok: Any) -> None:
    ids, open_think = chat_prompt(tok, "What is 1 + 1?", system="Be brief.")
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    assert not open_think
    think = tok.convert_tokens_to_ids("</think>")
    assert "</think>" in decode(tok, [think])


def test_load_picks_our_engine_for_a_qwen2_directory(tmp_path: Path, tok: Any, model: Any) -> None:
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert load(tmp_path).generator.name == "continuous"
    assert load(tmp_path, backend="generate").generator.name == "transformers"


def test_gemm_path_can_be_pinned_by_environment() -> None:
    from branchmerge_trainer.evaluate.generate import LINEAR_ENV, linear_choice

    assert linear_choice({}) == "auto"
    assert linear_choice({LINEAR_ENV: "torch"}) == "torch"
    with pytest.raises(ValueError, match=LINEAR_ENV):
        linear_choice({LINEAR_ENV: "mkl"})
