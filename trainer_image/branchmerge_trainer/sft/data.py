"""SFT data: read chat records from storage, template them, mask the loss, pack rows.

The pipeline is ``read_records`` (JSONL/Parquet, local or S3, errors name file and line) →
``normalize`` (``messages`` / ``prompt``+``response`` / ShareGPT ``conversations`` → one
message list) → ``ChatEncoder`` (the tokenizer's chat template; loss only on assistant
tokens, ``<think>…</think>`` kept in the target) → length policy → ``pack_rows`` →
``collate`` into one padding-free ``Batch``.

Every mode computes on a flat token stream with segment boundaries (``cu_seqlens``) — the
flash-attention varlen layout. ``neat`` makes every document its own segment (positions
restart, no attention across documents); ``packed`` makes every row one segment (documents
in a row see each other, as in plain concatenation); ``none`` is one document per row. No
padding token is ever computed, so ``none`` costs no padding either; packing only changes
how many documents form one optimizer row (and, for ``packed``, the attention).
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from bisect import bisect_left, insort
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..runtime import StageInputError
from ..stages import DatasetRef, StorageConfig
from ..storage import MANIFEST, Storage, storage_for

log = logging.getLogger("branchmerge.sft.data")

PackingMode = Literal["none", "packed", "neat"]
Message = dict[str, str]

_ROLES = {"system", "user", "assistant", "tool"}
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
#: How many bad records are collected before reporting; enough to see a pattern.
_MAX_ERRORS = 5


# --------------------------------------------------------------------------- reading


def _format_of(name: str, declared: str) -> str | None:
    if declared != "auto":
        return declared
    lower = name.lower()
    if lower.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")):
        return "jsonl"
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    return None


def dataset_files(ref: DatasetRef, storage: Storage) -> list[tuple[str, str]]:
    """``(uri, format)`` of every data file a ref names: the file itself, or the data files
    under a prefix (sorted, manifests and unknown extensions skipped)."""
    uri = ref.uri.rstrip("/")
    listing = storage.list(uri)
    if len(listing) == 1 and listing[0].key == "":  # a single local file
        fmt = _format_of(uri, ref.format)
        return [(uri, fmt or "jsonl")]
    files: list[tuple[str, str]] = []
    for obj in listing:
        if obj.key.rsplit("/", 1)[-1] in {MANIFEST, ""} or obj.key.startswith("."):
            continue
        fmt = _format_of(obj.key, ref.format)
        if fmt is not None:
            files.append((f"{uri}/{obj.key}", fmt))
    if not files and storage.exists(uri):  # an S3 object given directly
        return [(uri, _format_of(uri, ref.format) or "jsonl")]
    if not files:
        raise StageInputError(
            f"{ref.uri}: no data found; point datasets[].uri at a .jsonl/.parquet file or a prefix holding them"
        )
    return files


def _jsonl_records(storage: Storage, uri: str) -> Iterator[tuple[str, Any]]:
    stream = storage.open_read(uri)
    reader: Any = gzip.GzipFile(fileobj=stream) if uri.endswith(".gz") else stream
    try:
        for lineno, raw in enumerate(reader, start=1):
            where = f"{uri}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise StageInputError(
                    f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    "re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`"
                ) from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise StageInputError(
                    f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
                ) from None
    finally:
        reader.close()


def _parquet_records(storage: Storage, uri: str, cache_dir: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    local = storage.local_path(uri)
    source: Any
    if local is not None:
        source = str(local)
    else:
        dest = cache_dir / "datasets" / re.sub(r"[^A-Za-z0-9._-]", "_", uri)
        if not dest.exists():
            storage.download_file(uri, dest)
        source = str(dest)
    try:
        pf = pq.ParquetFile(source)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise StageInputError(f"{uri}: not a readable Parquet file ({e}); rewrite it with pyarrow/pandas") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            yield f"{uri}:row {row}", rec


def read_records(ref: DatasetRef, storage: Storage, cache_dir: Path) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for every record of a dataset ref, at most ``maxSamples``."""
    count = 0
    for uri, fmt in dataset_files(ref, storage):
        n_file = 0
        it = _parquet_records(storage, uri, cache_dir) if fmt == "parquet" else _jsonl_records(storage, uri)
        for where, rec in it:
            if ref.max_samples is not None and count >= ref.max_samples:
                return
            n_file += 1
            count += 1
            yield where, rec
        if n_file == 0:
            raise StageInputError(
                f"{uri}: the file has no records; remove it from the dataset or regenerate it"
            )


# --------------------------------------------------------------------------- records


def _fix_hint() -> str:
    return (
        "each record needs 'messages' (a list of {role, content} with at least one assistant turn), "
        "or 'prompt' and 'response' strings (optionally 'system')"
    )


def normalize(record: Any, where: str) -> list[Message]:
    """One chat as ``[{role, content}]`` from any supported record shape."""
    if not isinstance(record, dict):
        raise StageInputError(f"{where}: expected a JSON object, got {type(record).__name__}; {_fix_hint()}")
    if "messages" in record or "conversations" in record:
        key = "messages" if "messages" in record else "conversations"
        turns = record[key]
        if not isinstance(turns, list) or not turns:
            raise StageInputError(f"{where}: '{key}' must be a non-empty list; {_fix_hint()}")
        messages: list[Message] = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise StageInputError(f"{where}: {key}[{i}] is not an object; {_fix_hint()}")
            if "role" in turn:
                role, content = turn.get("role"), turn.get("content")
            else:  # ShareGPT: {"from": "human"|"gpt"|"system", "value": …}
                role, content = _SHAREGPT_ROLES.get(str(turn.get("from"))), turn.get("value")
            if role not in _ROLES:
                raise StageInputError(
                    f"{where}: {key}[{i}] has role {turn.get('role', turn.get('from'))!r}; "
                    f"use one of {sorted(_ROLES)}"
                )
            if not isinstance(content, str):
                raise StageInputError(f"{where}: {key}[{i}] ({role}) has no string 'content'; {_fix_hint()}")
            messages.append({"role": str(role), "content": content})
        if not any(m["role"] == "assistant" and m["content"] for m in messages):
            raise StageInputError(f"{where}: no non-empty assistant turn to learn from; {_fix_hint()}")
        return messages
    prompt, response = record.get("prompt"), record.get("response")
    if prompt is None or response is None:
        missing = [k for k in ("prompt", "response") if record.get(k) is None]
        raise StageInputError(
            f"{where}: missing field(s) {missing} (keys present: {sorted(record)[:8]}); {_fix_hint()}"
        )
    if not isinstance(prompt, str) or not isinstance(response, str) or not response:
        raise StageInputError(f"{where}: 'prompt' and 'response' must be strings, response non-empty; {_fix_hint()}")
    out: list[Message] = []
    system = record.get("system")
    if system:
        if not isinstance(system, str):
            raise StageInputError(f"{where}: 'system' must be a string")
        out.append({"role": "system", "content": system})
    out += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return out


class ChatEncoder:
    """Chat template → ``(token ids, loss mask)``.

    Templates with ``{% generation %}`` markers give the mask directly (every assistant turn is
    trained). Others — and templates that rewrite assistant text, like the R1-distill one that
    drops ``<think>`` from history — are rendered as prompt (up to the last assistant turn, with
    the generation prompt) + the last assistant content verbatim + end token, which trains the
    reasoning exactly as the teacher wrote it.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        template = tokenizer.chat_template
        if not isinstance(template, str) or not template:
            raise StageInputError(
                "the student's tokenizer has no chat template; add one (tokenizer_config.json 'chat_template')"
            )
        self.use_markers = bool(_GENERATION_TAG.search(template))
        self._markers_checked = False
        self.eos = tokenizer.eos_token or ""

    def encode(self, messages: list[Message]) -> tuple[np.ndarray, np.ndarray]:
        if self.use_markers:
            out = self.tok.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            ids = np.asarray(out["input_ids"], dtype=np.int32)
            mask = np.asarray(out["assistant_masks"], dtype=bool)
            if not self._markers_checked and "</think>" in messages[-1]["content"]:
                self._markers_checked = True
                if "</think>" not in self.tok.decode(ids[mask].tolist()):
                    log.warning("chat template drops <think> from the target; rendering the last turn verbatim")
                    self.use_markers = False
                    return self.encode(messages)
            return ids, mask
        return self._encode_last_turn(messages)

    def _encode_last_turn(self, messages: list[Message]) -> tuple[np.ndarray, np.ndarray]:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = self.tok.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        full = self.tok.apply_chat_template(messages[: last + 1], tokenize=False)
        content = messages[last]["content"]
        target = full[len(prompt) :] if full.startswith(prompt) and content in full[len(prompt) :] else ""
        if not target:
            target = content + self.eos
        p_ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        t_ids = self.tok(target, add_special_tokens=False)["input_ids"]
        ids = np.asarray(list(p_ids) + list(t_ids), dtype=np.int32)
        mask = np.zeros(len(ids), dtype=bool)
        mask[len(p_ids) :] = True
        return ids, mask


# --------------------------------------------------------------------------- examples


@dataclass
class Example:
    input_ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # bool [n]; True where the token is a training target
    where: str

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataStats:
    records: int = 0
    examples: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0
    rows: int = 0
    packing_efficiency: float = 0.0
    longest_dropped: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {
            "records": self.records,
            "examples": self.examples,
            "dropped_samples": self.dropped_too_long + self.dropped_no_target,
            "dropped_too_long": self.dropped_too_long,
            "truncated_samples": self.truncated,
            "dataset_tokens": self.tokens,
            "dataset_target_tokens": self.target_tokens,
            "rows": self.rows,
            "packing_efficiency": round(self.packing_efficiency, 4),
        }


def load_examples(
    datasets: Sequence[DatasetRef],
    storage_config: StorageConfig,
    tokenizer: Any,
    cache_dir: Path,
    *,
    max_length: int,
    truncation: Literal["drop", "truncate"],
) -> tuple[list[Example], DataStats]:
    """Read, validate, template and length-filter every record of every dataset."""
    encoder = ChatEncoder(tokenizer)
    stats = DataStats()
    examples: list[Example] = []
    errors: list[str] = []
    for ref in datasets:
        storage = storage_for(ref.uri, storage_config)
        for where, record in read_records(ref, storage, cache_dir):
            stats.records += 1
            try:
                messages = normalize(record, where)
            except StageInputError as e:
                errors.append(str(e))
                if len(errors) >= _MAX_ERRORS:
                    break
                continue
            ids, mask = encoder.encode(messages)
            if len(ids) > max_length:
                if truncation == "drop":
                    stats.dropped_too_long += 1
                    if len(stats.longest_dropped) < 3:
                        stats.longest_dropped.append(f"{where} ({len(ids)} tokens)")
                    continue
                ids, mask = ids[:max_length], mask[:max_length]
                stats.truncated += 1
            if not mask[1:].any():  # the first token can never be a target
                stats.dropped_no_target += 1
                continue
            examples.append(Example(ids, mask, where))
            stats.tokens += len(ids)
            stats.target_tokens += int(mask[1:].sum())
        if len(errors) >= _MAX_ERRORS:
            break
    if errors:
        more = " (stopped after the first few)" if len(errors) >= _MAX_ERRORS else ""
        raise StageInputError(f"{len(errors)} bad record(s){more}:\n" + "\n".join(errors))
    if stats.dropped_too_long:
        log.warning(
            "dropped %d sample(s) longer than maxSequenceLength=%d, e.g. %s; raise maxSequenceLength or "
            "set truncation: truncate to keep them",
            stats.dropped_too_long,
            max_length,
            ", ".join(stats.longest_dropped),
        )
    if not examples:
        if stats.records == 0:
            raise StageInputError("the datasets hold no records; check datasets[].uri")
        hint = (
            f"all {stats.records} record(s) are longer than maxSequenceLength={max_length} "
            f"(e.g. {', '.join(stats.longest_dropped)}); raise training.maxSequenceLength or set "
            "training.truncation: truncate"
            if stats.dropped_too_long == stats.records
            else f"no record has a trainable assistant token within maxSequenceLength={max_length}"
        )
        raise StageInputError(hint)
    stats.examples = len(examples)
    return examples, stats


# --------------------------------------------------------------------------- packing


def pack_rows(lengths: Sequence[int], capacity: int, mode: PackingMode) -> list[list[int]]:
    """Group example indices into rows of at most ``capacity`` tokens.

    ``none``: one example per row. ``packed``/``neat``: best-fit decreasing — each example,
    longest first, goes into the fullest row it still fits (O(n log n) with a sorted list of
    free space). No example is split: a continuation without its prompt would teach the model
    to answer questions it never saw.
    """
    if mode == "none":
        return [[i] for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens > row capacity {capacity}")
        k = bisect_left(free, (n, -1))
        if k < len(free):
            space, r = free.pop(k)
            rows[r].append(i)
            if space - n > 0:
                insort(free, (space - n, r))
        else:
            rows.append([i])
            if capacity - n > 0:
                insort(free, (capacity - n, len(rows) - 1))
    return rows


def packing_efficiency(lengths: Sequence[int], rows: Sequence[Sequence[int]], capacity: int, mode: PackingMode) -> float:
    """Real tokens / row tokens. Rows of ``packed``/``neat`` are ``capacity`` long; a padded
    ``none`` batch would be as long as its longest example, which is what we report for it
    (we never compute that padding, but it tells how much packing would change)."""
    real = sum(lengths)
    if mode == "none":
        return 1.0 if real else 0.0
    return real / max(1, len(rows) * capacity)


# --------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """One micro-batch, flattened to a single padding-free row (the varlen layout)."""

    input_ids: Any  # LongTensor [1, T]
    position_ids: Any  # LongTensor [1, T]
    cu_seqlens: Any  # IntTensor [S + 1]: attention segment boundaries
    max_seqlen: int
    target_index: Any  # LongTensor [K]: positions whose next token is trained
    target_ids: Any  # LongTensor [K]
    target_doc: Any  # LongTensor [K]: which document (0..D-1) each target belongs to
    num_docs: int
    num_tokens: int
    num_targets: int
    seg_lengths: list[int]

    def to(self, device: Any) -> Batch:
        for name in ("input_ids", "position_ids", "cu_seqlens", "target_index", "target_ids", "target_doc"):
            setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        return self


def collate(examples: Sequence[Example], rows: Sequence[Sequence[int]], mode: PackingMode) -> Batch:
    """Flatten ``rows`` of examples into one ``Batch``.

    Targets are computed here, never crossing a document end, so the loss does not depend on
    the packing mode; only the attention segments (documents for none/neat, rows for packed)
    and position ids (restart per document for neat, per row for packed) differ.
    """
    import torch

    docs = [examples[i] for row in rows for i in row]
    doc_lens = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    ids = np.concatenate([d.input_ids for d in docs]).astype(np.int64)
    mask = np.concatenate([d.loss_mask for d in docs])
    doc_starts = np.concatenate([[0], np.cumsum(doc_lens)])
    total = int(doc_starts[-1])

    if mode == "packed":
        seg_lens = np.asarray([sum(len(examples[i]) for i in row) for row in rows], dtype=np.int64)
    else:
        seg_lens = doc_lens
    seg_starts = np.concatenate([[0], np.cumsum(seg_lens)])
    positions = np.arange(total, dtype=np.int64) - np.repeat(seg_starts[:-1], seg_lens)

    # position p predicts token p+1 when p+1 is a target of the same document
    nxt = np.zeros(total, dtype=bool)
    nxt[:-1] = mask[1:]
    nxt[doc_starts[1:] - 1] = False
    target_index = np.nonzero(nxt)[0]
    doc_of_pos = np.repeat(np.arange(len(docs)), doc_lens)
    return Batch(
        input_ids=torch.from_numpy(ids).unsqueeze(0),
        position_ids=torch.from_numpy(positions).unsqueeze(0),
        cu_seqlens=torch.from_numpy(seg_starts.astype(np.int32)),
        max_seqlen=int(seg_lens.max()),
        target_index=torch.from_numpy(target_index),
        target_ids=torch.from_numpy(ids[target_index + 1]),
        target_doc=torch.from_numpy(doc_of_pos[target_index]),
        num_docs=len(docs),
        num_tokens=total,
        num_targets=len(target_index),
        seg_lengths=[int(x) for x in seg_lens],
    )


class RowSchedule:
    """Which rows each optimizer step trains on, as a pure function of the step.

    The row stream is epoch 0's permutation, then epoch 1's, … (each seeded by
    ``(seed, epoch)``); step ``s`` takes rows ``[s·G, (s+1)·G)``. Resuming needs only the step
    number, and fractional epochs fall out naturally.
    """

    def __init__(self, num_rows: int, global_batch: int, seed: int) -> None:
        self.num_rows = num_rows
        self.global_batch = global_batch
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)}
        return self._perms[epoch]

    def step_rows(self, step: int) -> list[int]:
        start = step * self.global_batch
        out = []
        for i in range(start, start + self.global_batch):
            out.append(int(self._perm(i // self.num_rows)[i % self.num_rows]))
        return out

    def epoch_at(self, step: int) -> float:
        return step * self.global_batch / self.num_rows


def split_micro_batches(rows: Sequence[int], rank: int, world_size: int, micro_batch: int) -> list[list[int]]:
    """This rank's share of one global batch (``rows[rank::world]``) in micro-batches."""
    mine = list(rows[rank::world_size])
    return [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]

