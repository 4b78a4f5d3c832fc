"""Neat packing is exact: packed rows give every document the logits and loss it gets alone."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from branchmerge_trainer.sft.attention import VARLEN, register, varlen_kwargs
from branchmerge_trainer.sft.data import Example, collate
from branchmerge_trainer.sft.train import CausalLMLoss, batch_args
from branchmerge_trainer.tiny import build_model, build_tokenizer, sample_corpus


@pytest.fixture(scope="module")
def model() -> Any:
    tok = build_tokenizer(sample_corpus(), vocab_size=512)
    m = build_model(tok, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    register()
    m.set_attn_implementation(VARLEN)
    m.config.use_cache = False
    return m.eval()


def _docs(seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for n in (9, 17, 5, 23):
        mask = np.zeros(n, bool)
        mask[n // 3 :] = True
        out.append(Example(rng.integers(5, 500, n).astype(np.int32), mask, "x"))
    return out


def _alone(model: Any, doc: Example) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the document on its own through stock SDPA attention."""
    model.set_attn_implementation("sdpa")
    try:
        ids = torch.tensor(doc.input_ids, dtype=torch.long)[None]
        logits = model(input_ids=ids, use_cache=False).logits[0]
    finally:
        model.set_attn_implementation(VARLEN)
    targets = torch.tensor(doc.input_ids[1:], dtype=torch.long)
    losses = torch.nn.functional.cross_entropy(logits[:-1].float(), targets, reduction="none")
    return logits, losses[torch.from_numpy(doc.loss_mask[1:])]


def test_neat_packing_matches_each_document_alone(model: Any) -> None:
    docs = _docs()
    batch = collate(docs, [[0, 1], [2, 3]], "neat")
    with torch.no_grad():
        hidden = model.model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            use_cache=False,
            **varlen_kwargs(batch.cu_seqlens, batch.max_seqlen),
        ).last_hidden_state
        packed_logits = model.lm_head(hidden)[0]
        packed_losses = CausalLMLoss(model).token_losses(*batch_args(batch))
        start = 0
        for d, doc in enumerate(docs):
            logits, losses = _alone(model, doc)
            assert torch.allclose(packed_logits[start : start + len(doc)], logits, atol=1e-5)
            assert torch.allclose(packed_losses[batch.target_doc == d], losses, atol=1e-5)
            start += len(doc)


def test_packed_mode_lets_documents_attend_to_each_other(model: Any) -> None:
    """The contrast that makes the test above meaningful: plain packing is not per-document."""
    docs = _docs(1)
    with torch.no_grad():
        neat = CausalLMLoss(model).token_losses(*batch_args(collate(docs, [[0, 1, 2, 3]], "neat")))
        packed = CausalLMLoss(model).token_losses(*batch_args(collate(docs, [[0, 1, 2, 3]], "packed")))
    first = collate(docs, [[0, 1, 2, 3]], "neat").target_doc == 0
    assert torch.allclose(neat[first], packed[first], atol=1e-5)  # the first document sees nothing before it
    assert not torch.allclose(neat[~first], packed[~first], atol=1e-3)


def test_bf16_autocast_neat_close_to_unpacked(model: Any) -> None:
    docs = _docs(2)
    batch = collate(docs, [[0, 1, 2, 3]], "neat")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed = CausalLMLoss(model).token_losses(*batch_args(batch))
        for d, doc in enumerate(docs):
            _, alone = _alone(model, doc)
            assert torch.allclose(packed[batch.target_doc == d], alone, atol=0.05)


def test_short_bf16_segments_match_sdpa() -> None:
    """The matmul path used for short bf16 segments on CPU agrees with SDPA per segment."""
    from types import SimpleNamespace

    from branchmerge_trainer.sft.attention import segment_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 50, 16) for _ in range(3))
    cu = torch.tensor([0, 20, 50], dtype=torch.int32)
    module: Any = SimpleNamespace(num_key_value_groups=1, sliding_window=None)
    fast, _ = segment_attention(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), None, cu_seq_lens_q=cu)
    for a, b in ((0, 20), (20, 50)):
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True)
        assert torch.allclose(fast[0, a:b].float(), ref[0].transpose(0, 1), atol=3e-2)
