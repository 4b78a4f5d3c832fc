"""SFT data: record shapes, chat templating, assistant-only loss, length policy, packing, bad data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_sft_helpers import chats, write_jsonl

from branchmerge_trainer.runtime import StageInputError
from branchmerge_trainer.sft.data import (
    ChatEncoder,
    Example,
    RowSchedule,
    collate,
    load_examples,
    normalize,
    pack_rows,
    packing_efficiency,
    split_micro_batches,
)
from branchmerge_trainer.stages import DatasetRef, StorageConfig
from branchmerge_trainer.tiny import build_tokenizer, sample_corpus

#: R1-distill style: drops the reasoning from assistant turns and has no generation markers.
R1_LIKE_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- set c = m['content'] -%}{%- if '</think>' in c -%}{%- set c = c.split('</think>')[-1] -%}{%- endif -%}"
    "{{ '<|im_start|>assistant\\n' + c + '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tokenizer(sample_corpus(), vocab_size=512)


def _load(tok: Any, paths: list[Path], **kw: Any) -> Any:
    kw.setdefault("max_length", 256)
    kw.setdefault("truncation", "drop")
    return load_examples(
        [DatasetRef(uri=str(p)) for p in paths], StorageConfig(), tok, paths[0].parent / "cache", **kw
    )


def test_record_shapes_normalize_to_messages() -> None:
    assert normalize({"prompt": "p", "response": "r", "system": "s"}, "f:1") == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "p"},
        {"role": "assistant", "content": "r"},
    ]
    sharegpt = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert normalize(sharegpt, "f:1")[1] == {"role": "assistant", "content": "a"}


def test_loss_only_on_assistant_tokens_and_think_kept(tok: Any) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<think>2+3=5</think>5"},
    ]
    ids, mask = ChatEncoder(tok).encode(msgs)
    assert tok.decode(ids[mask].tolist()) == "<think>2+3=5</think>5<|im_end|>"
    prompt_len = len(tok.apply_chat_template(msgs[:2], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    assert not mask[:prompt_len].any()
    # the targets the loss sees are exactly the assistant tokens (a prompt token is never a target)
    batch = collate([Example(ids, mask, "x")], [[0]], "neat")
    assert batch.target_ids.tolist() == ids[mask].tolist()
    assert (batch.target_index + 1).tolist() == np.nonzero(mask)[0].tolist()


def test_template_without_markers_keeps_reasoning(tok: Any) -> None:
    tok2 = build_tokenizer(sample_corpus(), vocab_size=512)
    tok2.chat_template = R1_LIKE_TEMPLATE
    msgs = [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "<think>why</think>answer"}]
    ids, mask = ChatEncoder(tok2).encode(msgs)
    assert tok2.decode(ids[mask].tolist()) == "<think>why</think>answer<|im_end|>"
    assert tok2.decode(ids[~mask].tolist()) == "<|im_start|>user\nq?<|im_end|>\n<|im_start|>assistant\n"


def test_length_policy_drop_and_truncate(tok: Any, tmp_path: Path) -> None:
    long = {"prompt": "Explain.", "response": "<think>" + " 1+1=2." * 200 + "</think>2"}
    path = write_jsonl(tmp_path / "d.jsonl", [*chats(6), long])
    examples, stats = _load(tok, [path], max_length=64, truncation="drop")
    assert (stats.records, stats.examples, stats.dropped_too_long) == (7, 6, 1)
    assert stats.metrics()["dropped_samples"] == 1
    examples, stats = _load(tok, [path], max_length=64, truncation="truncate")
    assert (stats.examples, stats.truncated, stats.dropped_too_long) == (7, 1, 0)
    assert max(len(e) for e in examples) == 64


def test_pack_rows_bfd_fills_rows() -> None:
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(30, 600, 400)]
    rows = pack_rows(lengths, 2048, "neat")
    assert sorted(i for r in rows for i in r) == list(range(400))
    assert all(sum(lengths[i] for i in r) <= 2048 for r in rows)
    assert packing_efficiency(lengths, rows, 2048, "neat") >= 0.95
    assert pack_rows(lengths, 2048, "none") == [[i] for i in range(400)]


def test_collate_positions_and_segments() -> None:
    a = Example(np.arange(5, dtype=np.int32), np.array([0, 0, 1, 1, 1], bool), "a")
    b = Example(np.arange(10, 14, dtype=np.int32), np.array([0, 1, 1, 1], bool), "b")
    neat = collate([a, b], [[0, 1]], "neat")
    assert neat.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert neat.cu_seqlens.tolist() == [0, 5, 9]
    # position 4 (end of a) must not predict b's first token
    assert neat.target_index.tolist() == [1, 2, 3, 5, 6, 7]
    assert neat.target_doc.tolist() == [0, 0, 0, 1, 1, 1]
    packed = collate([a, b], [[0, 1]], "packed")
    assert packed.position_ids.tolist() == [list(range(9))]
    assert packed.cu_seqlens.tolist() == [0, 9]
    assert packed.target_index.tolist() == neat.target_index.tolist()


def test_row_schedule_is_a_function_of_the_step() -> None:
    s = RowSchedule(10, 4, seed=1)
    stream = [r for step in range(5) for r in s.step_rows(step)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert RowSchedule(10, 4, seed=1).step_rows(3) == s.step_rows(3)
    assert split_micro_batches([0, 1, 2, 3, 4, 5, 6, 7], 1, 2, 2) == [[1, 3], [5, 7]]


def test_parquet_input(tok: Any, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [r for r in chats(9) if "prompt" in r]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "d.parquet")
    _, stats = _load(tok, [tmp_path / "d.parquet"])
    assert stats.examples == len(recs) == 3


def test_prefix_of_files_and_max_samples(tok: Any, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "ds" / "a.jsonl", chats(4))
    write_jsonl(tmp_path / "ds" / "b.jsonl", chats(4, seed=1))
    (tmp_path / "ds" / "README.md").write_text("not data")
    refs = [DatasetRef(uri=str(tmp_path / "ds"), maxSamples=6)]
    examples, stats = load_examples(refs, StorageConfig(), tok, tmp_path / "c", max_length=256, truncation="drop")
    assert stats.records == 6
    assert examples[-1].where.endswith("b.jsonl:2")


# --------------------------------------------------------------------------- bad data


def _error(tok: Any, path: Path, **kw: Any) -> str:
    with pytest.raises(StageInputError) as e:
        _load(tok, [path], **kw)
    return str(e.value)


def test_missing_fields_name_file_line_and_fix(tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [*chats(2), {"prompt": "hi"}])
    msg = _error(tok, path)
    assert f"{path}:3" in msg and "missing field(s) ['response']" in msg and "'messages'" in msg
    path = write_jsonl(tmp_path / "e.jsonl", [{"messages": [{"role": "user", "content": "only a question"}]}])
    assert "no non-empty assistant turn" in _error(tok, path)


def test_empty_file(tok: Any, tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    msg = _error(tok, path)
    assert str(path) in msg and "no records" in msg


def test_every_record_too_long(tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x", "response": "y " * 300}])
    msg = _error(tok, path, max_length=32)
    assert f"{path}:1" in msg and "maxSequenceLength=32" in msg and "truncation: truncate" in msg


def test_non_utf8_and_bad_json(tok: Any, tmp_path: Path) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(chats(1)[0]).encode() + b"\n" + '{"prompt": "caf\xe9", "response": "x"}\n'.encode("latin-1"))
    msg = _error(tok, path)
    assert f"{path}:2" in msg and "UTF-8" in msg and "iconv" in msg
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "response": \n')
    assert f"{path}:1: not valid JSON" in _error(tok, path)
