"""Sampling responses from a model: our continuous-batching engine, transformers, or vLLM.

Reasoning benchmarks produce responses of very different lengths: most stop early, a few
run to the token limit. A static batch (transformers' ``generate``) keeps computing every
row until its longest one ends, so most of its work is spent on rows that already finished.
:class:`ContinuousBatchingGenerator` refills a finished row's slot with the next prompt at
once, so the batch stays full of live rows. It reuses the model's own modules (embeddings,
norms, projections, rotary embedding, MLP) and owns only the attention and the KV cache,
which keeps its greedy outputs identical to transformers' in fp32.

:class:`TransformersGenerator` is the reference (left padding, batches sorted by prompt
length, stop at EOS) and the fallback for architectures the engine does not know.
:class:`VLLMGenerator` is used automatically when vLLM is installed (GPU images).

Determinism: each request carries its own seed; our engine draws every sampled token from
that request's own RNG, so a response does not depend on which other requests shared its
batch. On CPU the schedule itself is deterministic, so a run repeats exactly.
"""

from __future__ import annotations

import logging
import os
import random
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

#: ``hook(prompt_ids per row, tokens generated so far per row, logits[rows, vocab]) -> logits``.
#: Applied before sampling by every generator identically (benchmarks use it to shape
#: response lengths; it is how a test forces EOS on a schedule).
LogitsHook = Callable[[Sequence[Sequence[int]], Sequence[int], torch.Tensor], torch.Tensor]

OnDone = Callable[[int, "GenerationOutput"], None]

#: ``attend(layer, q, k, v, scale) -> attention output``: stores the new keys/values and attends.
_Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class GenerationOutput:
    token_ids: list[int]  # without the stop token
    finish_reason: Literal["stop", "length"]


class Generator(ABC):
    """Turns requests into responses; ``on_done(i, output)`` fires as each one finishes."""

    name: str = "generator"

    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest], on_done: OnDone | None = None) -> list[GenerationOutput]: ...

    def close(self) -> None:  # noqa: B027 - most generators hold nothing to release
        """Release the model (GPU memory) before the next one loads."""


def _eos_set(eos_token_ids: Sequence[int]) -> frozenset[int]:
    if not eos_token_ids:
        raise ValueError("generation needs at least one EOS token id to stop at")
    return frozenset(int(t) for t in eos_token_ids)


def _finish(tokens: list[int], eos: frozenset[int], limit: int) -> GenerationOutput:
    """Cut a raw continuation at its first stop token (static batches keep going after it)."""
    for i, t in enumerate(tokens[:limit]):
        if t in eos:
            return GenerationOutput(tokens[:i], "stop")
    return GenerationOutput(tokens[:limit], "length")


# --------------------------------------------------------------------------- transformers


class TransformersGenerator(Generator):
    """transformers' ``generate``: left-padded batches of similar prompt length.

    Batches are formed per sampling setting, with prompts sorted by length so little padding
    is computed. Sampled batches seed torch's global RNG from their first request's seed:
    reproducible for a fixed batch size, but a response depends on its batch mates.
    """

    name = "transformers"

    def __init__(
        self,
        model: Any,
        *,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        batch_size: int = 32,
        logits_hook: LogitsHook | None = None,
    ) -> None:
        self.model = model.eval()
        self.eos = _eos_set(eos_token_ids)
        self.pad = pad_token_id
        self.batch_size = batch_size
        self.hook = logits_hook
        self.device = next(model.parameters()).device
        self.max_context = int(getattr(model.config, "max_position_embeddings", 1 << 30))

    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest], on_done: OnDone | None = None) -> list[GenerationOutput]:
        from transformers import GenerationConfig, LogitsProcessorList

        results: list[GenerationOutput | None] = [None] * len(requests)
        order = sorted(
            range(len(requests)),
            key=lambda i: (requests[i].temperature, requests[i].top_p, requests[i].max_new_tokens, len(requests[i].prompt_ids)),
        )
        batches: list[list[int]] = []
        for i in order:
            last = batches[-1] if batches else None
            same = last is not None and _sampling_key(requests[last[0]]) == _sampling_key(requests[i])
            if last is not None and same and len(last) < self.batch_size:
                last.append(i)
            else:
                batches.append([i])
        for batch in batches:
            first = requests[batch[0]]
            prompts = [requests[i].prompt_ids for i in batch]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, p in enumerate(prompts):
                ids[row, width - len(p) :] = torch.tensor(p)
                mask[row, width - len(p) :] = 1
            sample = first.temperature > 0
            limit = min(first.max_new_tokens, self.max_context - width)
            if limit <= 0:
                for i in batch:
                    results[i] = GenerationOutput([], "length")
                    if on_done is not None:
                        on_done(i, results[i])  # type: ignore[arg-type]
                continue
            # Only the benchmark's settings: transformers fills every field left None from the
            # checkpoint's generation_config.json (top_k, repetition_penalty, min_p, …) and then
            # from its own defaults (top_k=50), so neutral values are set explicitly and the
            # checkpoint's config is swapped out for the call.
            warpers: dict[str, Any] = {}
            if sample:
                warpers = dict(temperature=first.temperature, top_p=first.top_p, top_k=0, min_p=0.0,
                               typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)  # fmt: skip
            config = GenerationConfig(
                max_new_tokens=limit,
                do_sample=sample,
                repetition_penalty=1.0,
                no_repeat_ngram_size=0,
                eos_token_id=sorted(self.eos),
                pad_token_id=self.pad,
                **warpers,
            )
            processors = LogitsProcessorList([_HookProcessor(self.hook, prompts, width)] if self.hook else [])
            if sample:
                torch.manual_seed(first.seed)
            checkpoint_config = self.model.generation_config
            self.model.generation_config = GenerationConfig(eos_token_id=sorted(self.eos), pad_token_id=self.pad)
            try:
                out = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    generation_config=config,
                    logits_processor=processors,
                )
            finally:
                self.model.generation_config = checkpoint_config
            for row, i in enumerate(batch):
                results[i] = _finish(out[row, width:].tolist(), self.eos, limit)
                if on_done is not None:
                    on_done(i, results[i])  # type: ignore[arg-type]
        return [r for r in results if r is not None]


def _sampling_key(r: GenerationRequest) -> tuple[float, float, int]:
    return (r.temperature, r.top_p, r.max_new_tokens)


class _HookProcessor:
    """Adapts a :data:`LogitsHook` to transformers' LogitsProcessor protocol."""

    def __init__(self, hook: LogitsHook | None, prompts: Sequence[Sequence[int]], width: int) -> None:
        self.hook, self.prompts, self.width = hook, prompts, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        assert self.hook is not None
        generated = input_ids.shape[1] - self.width
        return self.hook(self.prompts, [generated] * len(self.prompts), scores)


# --------------------------------------------------------------------------- continuous batching

SUPPORTED_ARCHITECTURES = frozenset({"qwen2", "qwen3", "llama", "mistral"})


class UnsupportedModel(ValueError):
    """The continuous-batching engine does not know this architecture (use transformers)."""


def check_supported(model: Any) -> None:
    """Raise :class:`UnsupportedModel` unless the engine computes exactly what the model does:
    a decoder of pre-norm layers with rotary GQA attention over *all* previous tokens."""
    config = model.config
    kind = getattr(config, "model_type", "?")
    if kind not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(f"model type {kind!r} (the engine handles {sorted(SUPPORTED_ARCHITECTURES)})")
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise UnsupportedModel("sliding-window attention layers")
    if kind == "mistral" and getattr(config, "sliding_window", None):
        raise UnsupportedModel("Mistral sliding-window attention")
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        raise UnsupportedModel(f"{type(model).__name__} does not have the expected decoder layout")
    for layer in inner.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")):
            raise UnsupportedModel("unexpected attention module")


def _linear_torch(x: torch.Tensor, m: Any) -> torch.Tensor:
    return F.linear(x, m.weight, m.bias)


def _linear_onednn(x: torch.Tensor, m: Any) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, m.weight, m.bias, "none", [], "")


def _pick_linear(model: Any, device: torch.device, dtype: torch.dtype, rows: int) -> tuple[Callable[[torch.Tensor, Any], torch.Tensor], str]:
    """The faster of torch's two fp32 CPU GEMM paths for this model's shapes: ``F.linear``
    (MKL) or oneDNN's linear (torch's ``mkldnn._linear_pointwise``, the kernel torch.compile
    uses on CPU). They compute the same fp32 dot products in a different summation order (the
    results agree to fp32 rounding, checked here); which is faster depends on the CPU —
    oneDNN uses AVX-512 on AMD Zen, where MKL does not (measured 2x on this project's bench
    machine). Timed once here on the model's widest MLP weight at ``rows`` rows; anything
    other than fp32 on CPU keeps ``F.linear``.
    """
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if device.type != "cpu" or dtype != torch.float32 or op is None or not torch.backends.mkldnn.is_available():
        return _linear_torch, "torch"
    weight = max((m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)), key=lambda w: w.numel())
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
    x = torch.randn(max(2, rows), weight.shape[1], generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            ref, got = _linear_torch(x, layer), _linear_onednn(x, layer)
            exact = x.double() @ weight.detach().double().t()
            err_torch, err_onednn = (ref.double() - exact).abs().max().item(), (got.double() - exact).abs().max().item()
            if err_onednn > 4 * err_torch + 1e-6 * exact.abs().max().item():
                return _linear_torch, "torch"  # not plain fp32 (a reduced-precision math mode)
            times = {}
            for name, fn in (("torch", _linear_torch), ("onednn", _linear_onednn)):
                best = float("inf")
                for _ in range(5):
                    start = time.perf_counter()
                    fn(x, layer)
                    best = min(best, time.perf_counter() - start)
                times[name] = best
    except (RuntimeError, TypeError):
        return _linear_torch, "torch"
    if times["onednn"] < 0.9 * times["torch"]:
        return _linear_onednn, "onednn"
    return _linear_torch, "torch"


def _is_plain_mlp(mlp: Any) -> bool:
    """``down(act(gate(x)) * up(x))`` with plain linear layers (Qwen2/3, Llama, Mistral)."""
    parts = [getattr(mlp, a, None) for a in ("gate_proj", "up_proj", "down_proj")]
    return callable(getattr(mlp, "act_fn", None)) and all(isinstance(p, torch.nn.Linear) for p in parts)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class _Row:
    index: int  # request index
    prompt: tuple[int, ...]
    limit: int  # max new tokens (also bounded by the model's context)
    temperature: float
    top_p: float
    rng: random.Random
    generated: list[int]


class _SlotCache:
    """K/V of every live row, right-aligned: all rows write their next token into column
    ``end``; row s owns columns ``[start[s], end]``. Left of ``start`` is padding (masked).

    Buffers hold ``capacity`` columns; they are compacted (everything shifted left by the
    padding all rows share) or grown only when full, so a step appends without copying.
    """

    def __init__(self, n_layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int, like: torch.Tensor) -> None:
        shape = (slots, kv_heads, capacity, head_dim)
        self.k = [like.new_zeros(shape) for _ in range(n_layers)]
        self.v = [like.new_zeros(shape) for _ in range(n_layers)]
        self.start = [0] * slots
        self.end = 0

    @property
    def slots(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def _move(self, src: int, dst: int, length: int) -> None:
        for buf in (*self.k, *self.v):
            buf[:, :, dst : dst + length] = buf[:, :, src : src + length].clone()

    def _grow(self, capacity: int) -> None:
        for bufs in (self.k, self.v):
            for i, buf in enumerate(bufs):
                new = buf.new_zeros((buf.shape[0], buf.shape[1], capacity, buf.shape[3]))
                new[:, :, : self.end] = buf[:, :, : self.end]
                bufs[i] = new

    def reserve(self, live: Sequence[int], columns: int, max_capacity: int) -> None:
        """Make room for ``columns`` more columns at ``end`` (shift out shared padding first)."""
        if self.end + columns <= self.capacity:
            return
        shift = min((self.start[s] for s in live), default=self.end)
        if shift > 0:
            self._move(shift, 0, self.end - shift)
            self.start = [max(0, x - shift) for x in self.start]
            self.end -= shift
        if self.end + columns > self.capacity:
            self._grow(min(max(2 * self.capacity, self.end + columns), max(max_capacity, self.end + columns)))

    def ensure_left(self, width: int, live: Sequence[int], max_capacity: int) -> None:
        """Make ``end >= width`` so a prompt of ``width`` tokens fits left of ``end``."""
        if self.end >= width:
            return
        shift = width - self.end
        if width + 1 > self.capacity:
            self._grow(max(2 * self.capacity, width + 1))
        self._move(0, shift, self.end)
        self.start = [x + shift for x in self.start]
        self.end += shift

    def move_row(self, src: int, dst: int) -> None:
        """Slot ``dst`` takes over slot ``src``'s K/V (``src`` becomes free)."""
        lo = self.start[src]
        for buf in (*self.k, *self.v):
            buf[dst, :, lo : self.end] = buf[src, :, lo : self.end]
        self.start[dst] = lo

    def select(self, slots: Sequence[int]) -> None:
        """Keep these slots, in this order (to shrink the batch, or to sort it by age)."""
        index = torch.tensor(slots, device=self.k[0].device)
        if len(slots) == self.slots:  # a reordering: move only the columns in use
            lo = min(self.start)
            for buf in (*self.k, *self.v):
                buf[:, :, lo : self.end] = buf[:, :, lo : self.end].index_select(0, index)
            self.start = [self.start[s] for s in slots]
            return
        self.k = [b.index_select(0, index) for b in self.k]
        self.v = [b.index_select(0, index) for b in self.v]
        self.start = [self.start[s] for s in slots]


class ContinuousBatchingGenerator(Generator):
    """Our engine: a fixed number of slots, each refilled with the next prompt the moment its
    row stops, so every step computes ``max_batch`` live rows instead of waiting for the
    longest row of a static batch.

    Each step is one forward pass over a flat list of tokens: the next token of every live
    row plus the whole prompts of the rows just admitted (prefill and decode share the
    GEMMs, so the weights are read from memory once per step, and no padding is computed).
    Once the queue is empty, finished rows' slots are filled by moving the last live rows
    down, so the tail attends over live slots only. Linear layers use the faster of torch's
    fp32 CPU GEMM paths for the machine (see :func:`_pick_linear`).
    """

    name = "continuous"

    def __init__(
        self,
        model: Any,
        *,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        max_batch: int = 32,
        logits_hook: LogitsHook | None = None,
        max_context: int | None = None,
        headroom: int = 256,
        admit_group: int = 1,
        attention_group: int = 8,
        regroup_every: int = 16,
        linear: Literal["auto", "torch", "onednn"] = "auto",
    ) -> None:
        """``headroom``: K/V columns allocated beyond the first prompts; the cache grows
        (doubling) or compacts when it runs out, so this only trades memory for copies.
        ``admit_group``: refill once this many slots are free (1: at once; new prompts are
        prefilled inside the next decode step, so refilling early costs no extra pass).
        ``attention_group`` / ``regroup_every``: decode attention runs per group of this many
        slots, each over its own oldest row's span; every ``regroup_every`` steps the slots
        are re-sorted by age when that shortens the spans enough.
        ``linear``: GEMM path of the linear layers; ``auto`` times both at load
        (:func:`_pick_linear`), ``torch`` is ``F.linear``, ``onednn`` forces oneDNN (fp32 CPU)."""
        check_supported(model)
        self.model = model.eval()
        self.inner = model.model
        self.eos = _eos_set(eos_token_ids)
        self.pad = pad_token_id
        self.max_batch = max_batch
        self.hook = logits_hook
        self.headroom = max(1, headroom)
        self.admit_group = max(1, min(admit_group, max_batch))
        self.attention_group = max(1, attention_group)
        self.regroup_every = max(1, regroup_every)
        self._steps = 0
        config = model.config
        self.max_context = max_context or int(getattr(config, "max_position_embeddings", 1 << 30))
        attn = self.inner.layers[0].self_attn
        self.head_dim = int(getattr(attn, "head_dim", config.hidden_size // config.num_attention_heads))
        self.kv_heads = int(config.num_key_value_heads)
        self.q_heads = int(config.num_attention_heads)
        self._plain_mlp = all(_is_plain_mlp(layer.mlp) for layer in self.inner.layers)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if linear == "auto":
            self._linear, self.linear_backend = _pick_linear(model, self.device, self.dtype, max_batch)
        elif linear == "onednn":
            if self.device.type != "cpu" or getattr(torch.ops.mkldnn, "_linear_pointwise", None) is None:
                raise ValueError("linear='onednn' needs a CPU model and a torch built with oneDNN")
            self._linear, self.linear_backend = _linear_onednn, "onednn"
        else:
            self._linear, self.linear_backend = _linear_torch, "torch"

    # -- the model, with our attention ------------------------------------------------

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, last: torch.Tensor, attend: _Attend) -> torch.Tensor:
        """Logits at the token indices ``last``, for one flat sequence of tokens from many rows
        (``ids``, ``positions``: ``[tokens]``). The projections and the MLP see every token of
        the step in one GEMM whatever row it belongs to; ``attend(layer, q, k, v, scale)``
        (``[tokens, heads, head_dim]`` each) stores the new keys/values and attends per row."""
        x = self.inner.embed_tokens(ids[None])
        cos, sin = self.inner.rotary_emb(x, positions[None])
        cos, sin = cos[0, :, None], sin[0, :, None]
        x = x[0]
        t = ids.shape[0]
        lin = self._linear
        for i, layer in enumerate(self.inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = lin(h, attn.q_proj).view(t, -1, self.head_dim)
            k = lin(h, attn.k_proj).view(t, -1, self.head_dim)
            v = lin(h, attn.v_proj).view(t, -1, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            o = attend(i, q, k, v, attn.scaling)
            x = x + lin(o.reshape(t, -1), attn.o_proj)
            h = layer.post_attention_layernorm(x)
            mlp = layer.mlp
            if self._plain_mlp:
                x = x + lin(mlp.act_fn(lin(h, mlp.gate_proj)) * lin(h, mlp.up_proj), mlp.down_proj)
            else:
                x = x + mlp(h)
        x = self.inner.norm(x.index_select(0, last))
        return lin(x, self.model.lm_head).float()

    # -- scheduling --------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest], on_done: OnDone | None = None) -> list[GenerationOutput]:
        results: list[GenerationOutput | None] = [None] * len(requests)
        if not requests:
            return []
        self._steps = 0
        # Longest prompts first: later prompts always fit left of the cache's end (no
        # shifting). Samples of one prompt stay adjacent, so they share one prefill.
        queue = deque(sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt_ids)))
        slots: list[_Row | None] = [None] * min(self.max_batch, len(requests))
        longest = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
        max_capacity = min(longest, self.max_context) + 1
        first_width = max(len(requests[i].prompt_ids) for i in list(queue)[: len(slots)])
        cache = _SlotCache(
            len(self.inner.layers), len(slots), self.kv_heads, self.head_dim,
            min(max_capacity, first_width + self.headroom), torch.empty(0, dtype=self.dtype, device=self.device),
        )  # fmt: skip

        def done(row: _Row, reason: Literal["stop", "length"]) -> None:
            out = GenerationOutput(row.generated, reason)
            results[row.index] = out
            if on_done is not None:
                on_done(row.index, out)

        while True:
            live = [s for s, r in enumerate(slots) if r is not None]
            if not live and not queue:
                break
            if not queue:
                self._compact(slots, cache)
            self._step(requests, queue, slots, cache, max_capacity, done)
        return [r for r in results if r is not None]

    def _take(self, requests: Sequence[GenerationRequest], queue: deque[int], n: int, done: Callable[[_Row, Literal["stop", "length"]], None]) -> list[_Row]:
        """The next ``n`` requests that need at least one token."""
        rows: list[_Row] = []
        while queue and len(rows) < n:
            i = queue.popleft()
            r = requests[i]
            if not r.prompt_ids:
                raise ValueError(f"request {i} has an empty prompt")
            row = _Row(
                index=i,
                prompt=tuple(r.prompt_ids),
                limit=max(0, min(r.max_new_tokens, self.max_context - len(r.prompt_ids))),
                temperature=r.temperature,
                top_p=r.top_p,
                rng=random.Random(r.seed),
                generated=[],
            )
            if row.limit == 0:
                done(row, "length")
                continue
            rows.append(row)
        return rows

    def _step(
        self,
        requests: Sequence[GenerationRequest],
        queue: deque[int],
        slots: list[_Row | None],
        cache: _SlotCache,
        max_capacity: int,
        done: Callable[[_Row, Literal["stop", "length"]], None],
    ) -> None:
        """One forward pass: the next token of every live row, and the prefill of new prompts
        into the free slots, in the same GEMMs (the weights are read once for both).

        The cache is right-aligned: every live row writes its token at column ``col``; a new
        prompt of ``p`` tokens fills columns ``col - p + 1 .. col`` of its slot, so from the
        next step on it is one more row writing at the common end.
        """
        live = [s for s, r in enumerate(slots) if r is not None]
        cache.reserve(live, 1, max_capacity)
        for s, row in enumerate(slots):
            if row is None:
                cache.start[s] = cache.end  # an empty slot attends to its own column only
        self._steps += 1
        if live and self._steps % self.regroup_every == 0:
            self._sort_by_age(slots, cache, cache.end)
            live = [s for s, r in enumerate(slots) if r is not None]
        free = [s for s, r in enumerate(slots) if r is None]
        new: list[_Row] = []
        if queue and free and (len(free) >= self.admit_group or not live):
            new = self._take(requests, queue, len(free), done)
        if not live and not new:
            return
        # Samples of one problem share their prompt: prefill each distinct prompt once and
        # copy its K/V into every slot that needs it (16x less prefill for AIME's protocol).
        unique: dict[tuple[int, ...], int] = {}
        for row in new:
            unique.setdefault(row.prompt, len(unique))
        prompts = list(unique)
        if prompts:
            cache.ensure_left(max(len(p) for p in prompts), live, max_capacity)
        col = cache.end
        targets = free[: len(new)]
        dests: list[list[int]] = [[] for _ in prompts]
        for s, row in zip(targets, new, strict=True):
            dests[unique[row.prompt]].append(s)
            cache.start[s] = col  # until the forward is done (their decode rows are unused)

        n_live = len(live)
        tokens: list[int] = []
        positions: list[int] = []
        for s in live:
            row = slots[s]
            assert row is not None
            tokens.append(row.generated[-1])
            positions.append(len(row.prompt) + len(row.generated) - 1)
        spans: list[tuple[int, int]] = []
        for prompt in prompts:
            spans.append((len(tokens), len(prompt)))
            tokens.extend(prompt)
            positions.extend(range(len(prompt)))
        last = list(range(n_live)) + [off + p - 1 for off, p in spans]

        # Decode attention runs over slots [0, m) only: empty slots past the last live one
        # (the tail, kept packed by _compact) cost nothing.
        m = max(live) + 1 if live else 0
        dense = live == list(range(m))
        live_index = torch.tensor(live, device=self.device)
        groups = self._attention_groups(cache.start[:m], col) if n_live else []
        # Decode queries scattered into their slots (empty and new slots' rows stay 0, unused).
        q_buffer = torch.zeros((0 if dense else m, self.q_heads, 1, self.head_dim), dtype=self.dtype, device=self.device)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            keys, values = cache.k[layer], cache.v[layer]
            outs: list[torch.Tensor] = []
            if n_live:
                kd, vd, qd = k[:n_live, :, None], v[:n_live, :, None], q[:n_live, :, None]
                if dense:
                    keys[:m, :, col : col + 1] = kd
                    values[:m, :, col : col + 1] = vd
                else:
                    keys[:m, :, col : col + 1].index_copy_(0, live_index, kd)
                    values[:m, :, col : col + 1].index_copy_(0, live_index, vd)
                    qd = q_buffer.index_copy_(0, live_index, qd)
                o = torch.cat([
                    F.scaled_dot_product_attention(
                        qd[a:b], keys[a:b, :, lo : col + 1], values[a:b, :, lo : col + 1],
                        attn_mask=mask, scale=scale, enable_gqa=True,
                    )
                    for a, b, lo, mask in groups
                ]) if len(groups) > 1 else F.scaled_dot_product_attention(
                    qd, keys[:m, :, groups[0][2] : col + 1], values[:m, :, groups[0][2] : col + 1],
                    attn_mask=groups[0][3], scale=scale, enable_gqa=True,
                )  # fmt: skip
                if not dense:
                    o = o.index_select(0, live_index)
                outs.append(o[:, :, 0])
            for (off, p), slots_of in zip(spans, dests, strict=True):
                kp, vp = k[off : off + p].transpose(0, 1), v[off : off + p].transpose(0, 1)
                for s in slots_of:
                    keys[s, :, col - p + 1 : col + 1] = kp
                    values[s, :, col - p + 1 : col + 1] = vp
                o = F.scaled_dot_product_attention(
                    q[off : off + p].transpose(0, 1)[None], kp[None], vp[None], is_causal=True, scale=scale, enable_gqa=True
                )
                outs.append(o[0].transpose(0, 1))
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        logits = self._forward(
            torch.tensor(tokens, device=self.device),
            torch.tensor(positions, device=self.device),
            torch.tensor(last, device=self.device),
            attend,
        )
        cache.end = col + 1
        for s, row in zip(targets, new, strict=True):
            cache.start[s] = col + 1 - len(row.prompt)
            slots[s] = row
        if len(prompts) < len(new):  # shared prompts: one logits row per new row
            source = torch.tensor([n_live + unique[row.prompt] for row in new], device=self.device)
            logits = torch.cat([logits[:n_live], logits.index_select(0, source)])
        rows = [r for r in (slots[s] for s in live) if r is not None] + new
        self._advance(rows, live + targets, logits, slots, done)

    def _attention_groups(self, starts: Sequence[int], col: int) -> list[tuple[int, int, int, torch.Tensor]]:
        """Slot ranges ``[a, b)``, the first column ``lo`` each attends from, and their masks.

        Rows are right-aligned, so one attention call over all slots spans the *oldest* row's
        length for every row; with a few long responses most of that is masked padding.
        Contiguous groups of slots (kept roughly sorted by age, see :meth:`_sort_by_age`)
        each attend over their own oldest row's span instead — views, no copies.
        """
        n, size = len(starts), self.attention_group
        spans = [(a, min(a + size, n), min(starts[a : a + size])) for a in range(0, n, size)]
        grouped = sum((b - a) * (col + 1 - lo) for a, b, lo in spans)
        if len(spans) == 1 or grouped > 0.8 * n * (col + 1 - min(starts)):
            spans = [(0, n, min(starts))]  # not worth the extra calls
        start = torch.tensor(starts, device=self.device)
        return [
            (a, b, lo, (torch.arange(lo, col + 1, device=self.device)[None, :] >= start[a:b, None])[:, None, None, :])
            for a, b, lo in spans
        ]

    @staticmethod
    def _compact(slots: list[_Row | None], cache: _SlotCache) -> None:
        """Once no prompt is waiting, keep the live rows in slots ``[0, live)``: move the last
        live rows into the holes left by finished ones (one row's K/V each, no full copy)."""
        n = sum(r is not None for r in slots)
        holes = [s for s in range(n) if slots[s] is None]
        movers = [s for s in range(len(slots) - 1, n - 1, -1) if slots[s] is not None]
        for dst, src in zip(holes, movers, strict=True):
            cache.move_row(src, dst)
            slots[dst], slots[src] = slots[src], None

    def _sort_by_age(self, slots: list[_Row | None], cache: _SlotCache, col: int) -> None:
        """Reorder slots oldest first (empty ones last) when that shrinks the attention spans
        of :meth:`_attention_groups` enough to pay for moving the cache rows."""
        n, size = len(slots), self.attention_group
        if n <= size:
            return

        def cost(order: Sequence[int]) -> int:
            starts = [cache.start[s] for s in order]
            return sum((min(a + size, n) - a) * (col + 1 - min(starts[a : a + size])) for a in range(0, n, size))

        order = sorted(range(n), key=lambda s: (slots[s] is None, cache.start[s]))
        if cost(order) < 0.75 * cost(range(n)):
            cache.select(order)
            slots[:] = [slots[s] for s in order]

    def _advance(
        self,
        rows: list[_Row],
        slot_ids: list[int],
        logits: torch.Tensor,
        slots: list[_Row | None],
        done: Callable[[_Row, Literal["stop", "length"]], None],
    ) -> None:
        if self.hook is not None:
            logits = self.hook([r.prompt for r in rows], [len(r.generated) for r in rows], logits)
        for s, row, token in zip(slot_ids, rows, choose_tokens(logits, rows), strict=True):
            if token in self.eos:
                slots[s] = None
                done(row, "stop")
                continue
            row.generated.append(token)
            if len(row.generated) >= row.limit:
                slots[s] = None
                done(row, "length")


def choose_tokens(logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
    """Greedy for temperature 0, else temperature + nucleus (top-p) sampling, each row with
    its own RNG so a row's sample does not depend on its batch mates."""
    chosen = logits.argmax(dim=-1).tolist()
    sampled = [j for j, r in enumerate(rows) if r.temperature > 0]
    if not sampled:
        return [int(t) for t in chosen]
    idx = torch.tensor(sampled, device=logits.device)
    temps = torch.tensor([rows[j].temperature for j in sampled], device=logits.device)[:, None]
    top_p = torch.tensor([rows[j].top_p for j in sampled], device=logits.device)[:, None]
    probs = torch.softmax(logits.index_select(0, idx).float() / temps, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    cum = sorted_probs.cumsum(dim=-1)
    keep = (cum - sorted_probs) < top_p  # the smallest prefix reaching top_p (never empty)
    kept = sorted_probs * keep
    u = torch.tensor([rows[j].rng.random() for j in sampled], device=logits.device, dtype=kept.dtype)
    cdf = kept.cumsum(dim=-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=probs.shape[-1] - 1)
    picked = order.gather(1, pick).squeeze(1).tolist()
    for j, t in zip(sampled, picked, strict=True):
        chosen[j] = t
    return [int(t) for t in chosen]


# --------------------------------------------------------------------------- vLLM


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # vLLM import can fail in many ways without a GPU
        return False
    return bool(torch.cuda.is_available())


class VLLMGenerator(Generator):  # pragma: no cover - needs a GPU and vLLM
    """vLLM's engine (paged attention, continuous batching on GPU), one seed per request."""

    name = "vllm"

    def __init__(self, model_dir: Path, *, eos_token_ids: Sequence[int], max_model_len: int | None = None) -> None:
        from vllm import LLM

        self.eos = sorted(_eos_set(eos_token_ids))
        self.llm = LLM(
            model=str(model_dir),
            tensor_parallel_size=max(1, torch.cuda.device_count()),
            max_model_len=max_model_len,
            trust_remote_code=False,
        )

    def generate(self, requests: Sequence[GenerationRequest], on_done: OnDone | None = None) -> list[GenerationOutput]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                temperature=r.temperature,
                top_p=r.top_p if r.temperature > 0 else 1.0,
                max_tokens=r.max_new_tokens,
                seed=r.seed,
                stop_token_ids=self.eos,
            )
            for r in requests
        ]
        prompts: Any = [{"prompt_token_ids": list(r.prompt_ids)} for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for i, out in enumerate(outputs):
            completion = out.outputs[0]
            tokens = [t for t in completion.token_ids if t not in self.eos]
            result = GenerationOutput(tokens, "length" if completion.finish_reason == "length" else "stop")
            results.append(result)
            if on_done is not None:
                on_done(i, result)
        return results

    def close(self) -> None:
        del self.llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    generator: Generator
    tokenizer: Any
    eos_token_ids: list[int]


def eos_token_ids(tokenizer: Any, model_dir: Path) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS plus the generation config's.

    Chat models often end a turn with a token (``<|im_end|>``) other than the pretraining EOS
    (``<|endoftext|>``); stopping at only one of them lets responses run on to the limit and
    be scored as truncated.
    """
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(model_dir)
        extra = gen.eos_token_id
        ids += [int(t) for t in (extra if isinstance(extra, list) else [extra]) if t is not None]
    except (OSError, ValueError):
        pass
    return sorted(set(ids))


#: Pins the GEMM path of the engine's linear layers (auto | torch | onednn): ``auto`` times
#: both at load, so a run under heavy load could pick differently from the last one; pin it
#: where bit-identical sampled outputs across runs matter.
LINEAR_ENV = "BRANCHMERGE_EVAL_LINEAR"


def linear_choice(environ: Mapping[str, str] | None = None) -> Literal["auto", "torch", "onednn"]:
    value = (os.environ if environ is None else environ).get(LINEAR_ENV, "auto").strip() or "auto"
    if value not in ("auto", "torch", "onednn"):
        raise ValueError(f"{LINEAR_ENV}={value!r}: use auto, torch or onednn")
    return value  # type: ignore[return-value]


def load(
    model_dir: Path,
    *,
    backend: Literal["auto", "transformers", "vllm", "continuous", "generate"] = "auto",
    batch_size: int = 32,
    device: str | None = None,
) -> LoadedModel:
    """Load a model directory for generation with the best backend available.

    ``auto``: vLLM when installed and a GPU is present, else our engine, else (unknown
    architecture) transformers' ``generate``. ``transformers`` means in-process torch: our
    engine when it supports the model, else ``generate``. ``continuous`` / ``generate`` force one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = eos_token_ids(tokenizer, model_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    if backend == "vllm" or (backend == "auto" and vllm_available()):
        return LoadedModel(VLLMGenerator(model_dir, eos_token_ids=eos), tokenizer, eos)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device)
    model.eval()
    if backend != "generate":
        try:
            engine = ContinuousBatchingGenerator(
                model, eos_token_ids=eos, pad_token_id=pad, max_batch=batch_size, linear=linear_choice()
            )
            log.info("generation: continuous batching, %d slots, %s GEMMs", batch_size, engine.linear_backend)
            return LoadedModel(engine, tokenizer, eos)
        except UnsupportedModel as e:
            if backend == "continuous":
                raise
            log.info("continuous batching does not support this model (%s); using transformers.generate", e)
    return LoadedModel(
        TransformersGenerator(model, eos_token_ids=eos, pad_token_id=pad, batch_size=batch_size), tokenizer, eos
    )


def chat_prompt(tokenizer: Any, user: str, system: str | None = None) -> tuple[list[int], bool]:
    """Token ids of a one-turn chat prompt, and whether it leaves a ``<think>`` block open.

    R1-style templates end the prompt with ``<think>\\n``; then a response without
    ``</think>`` never finished thinking and has no answer.
    """
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = (f"{system}\n\n" if system else "") + user + "\n"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return list(ids), text.rfind("<think>") > text.rfind("</think>")


def decode(tokenizer: Any, token_ids: Sequence[int]) -> str:
    """Response text *with* special tokens: ``<think>``/``</think>`` are special in many
    tokenizers, and skipping them would hide where the reasoning ends."""
    return str(tokenizer.decode(list(token_ids), skip_special_tokens=False))
