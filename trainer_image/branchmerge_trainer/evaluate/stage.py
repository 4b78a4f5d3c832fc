"""The Eval stage: score every model on every benchmark and publish records + scores.

``branchmerge-train eval --config FILE`` lands here (via runtime.execute, which has already
returned early if a committed output with this fingerprint exists). For each model:
load it once, then for each benchmark generate ``samples`` responses per problem, grade each
response as soon as it is generated (code runs in the sandbox on worker threads while
generation continues), and aggregate. Output layout under ``stage.output``::

    records/<model>/<benchmark>.jsonl   one line per (problem, sample): response, answer, verdict
    summary.json                        every score, pass@k curves, settings, timings
    _MANIFEST.json                      last; its ``extra.scores`` is what a cached re-run returns

The StageResult carries the compact scores (model × benchmark pass@1, counts, mean response
length, truncation) that the operator publishes on the Distillation's status.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime import StageContext, StageInputError
from ..stages import MAX_RESULT_BYTES, EvalStage, Progress, Score, StageResult
from ..storage import materialize_model, storage_for
from . import generate, sandbox
from .benchmarks import Benchmark, CodeTask, Prompt, Verdict, load_benchmark
from .scoring import BenchmarkSummary, SampleOutcome, summarize

log = logging.getLogger(__name__)


class _Tracker:
    """Progress over problems × samples (of every model and benchmark): one step per graded
    response, reported through the stage's rate-limited reporter."""

    def __init__(self, ctx: StageContext, total: int) -> None:
        self.ctx, self.total = ctx, total
        self.done = 0
        self.tokens = 0
        self.start = time.monotonic()
        self.lock = threading.Lock()

    def generated(self, tokens: int) -> None:
        with self.lock:
            self.tokens += tokens

    def graded(self, n: int = 1, *, force: bool = False) -> None:
        with self.lock:
            self.done += n
            elapsed = max(time.monotonic() - self.start, 1e-6)
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate > 0 else None
            progress = Progress(
                step=self.done,
                total_steps=self.total,
                tokens_per_second=round(self.tokens / elapsed, 1),
                eta_seconds=round(eta, 1) if eta is not None else None,
            )
            if self.ctx.is_main:  # under the lock: sandbox threads report too
                self.ctx.reporter.report(progress, force=force)


class _Grader:
    """Grades responses as they arrive. Math and multiple choice are graded in the calling
    (main) thread — math-verify's timeouts use signals; code goes to a thread pool of
    sandboxes, and identical programs for one problem are run once."""

    def __init__(self, bench: Benchmark, tracker: _Tracker) -> None:
        self.task = bench.task
        self.tracker = tracker
        self.results: dict[int, Future[Verdict] | Verdict] = {}
        self.pool: ThreadPoolExecutor | None = None
        self._by_program: dict[tuple[str, str], Future[Verdict]] = {}
        if isinstance(self.task, CodeTask):
            self.pool = ThreadPoolExecutor(max_workers=self.task.workers, thread_name_prefix="sandbox")

    def submit(self, i: int, prompt: Prompt, response: str, thinking_open: bool) -> None:
        if self.pool is None:
            self.results[i] = self.task.grade(prompt.problem, prompt.meta, response, thinking_open)
            self.tracker.graded()
            return
        from .answers import extract_program

        key = (prompt.problem.id, extract_program(response, thinking_open=thinking_open) or "")
        future = self._by_program.get(key)
        if future is None:
            future = self.pool.submit(self.task.grade, prompt.problem, prompt.meta, response, thinking_open)
            self._by_program[key] = future
        future.add_done_callback(lambda _f: self.tracker.graded())
        self.results[i] = future

    def verdicts(self, n: int) -> list[Verdict]:
        out = []
        for i in range(n):
            r = self.results[i]
            out.append(r.result() if isinstance(r, Future) else r)
        if self.pool is not None:
            self.pool.shutdown()
        return out


@dataclass
class _BenchmarkRun:
    summary: BenchmarkSummary
    records: list[dict[str, Any]]
    seconds: float
    generated_tokens: int


def evaluate_benchmark(loaded: generate.LoadedModel, bench: Benchmark, tracker: _Tracker) -> _BenchmarkRun:
    """Generate, grade and aggregate one benchmark for one loaded model."""
    start = time.monotonic()
    c = bench.config
    prompts = bench.prompts()
    requests, thinking = [], []
    for p in prompts:
        ids, open_think = generate.chat_prompt(loaded.tokenizer, p.user, p.system)
        requests.append(generate.GenerationRequest(tuple(ids), c.max_new_tokens, c.temperature, c.top_p, p.seed))
        thinking.append(open_think)
    grader = _Grader(bench, tracker)
    texts: dict[int, str] = {}

    def on_done(i: int, out: generate.GenerationOutput) -> None:
        texts[i] = generate.decode(loaded.tokenizer, out.token_ids)
        tracker.generated(len(out.token_ids))
        grader.submit(i, prompts[i], texts[i], thinking[i])

    outputs = loaded.generator.generate(requests, on_done=on_done)
    verdicts = grader.verdicts(len(prompts))
    records: list[dict[str, Any]] = []
    by_problem: dict[str, list[SampleOutcome]] = {}
    for i, (p, out, v) in enumerate(zip(prompts, outputs, verdicts, strict=True)):
        truncated = out.finish_reason == "length"
        by_problem.setdefault(p.id, []).append(SampleOutcome(v.correct, len(out.token_ids), truncated))
        records.append(
            {
                "problem": p.id,
                "sample": p.sample,
                "prompt_tokens": len(requests[i].prompt_ids),
                "response": texts[i],
                "response_tokens": len(out.token_ids),
                "finish_reason": out.finish_reason,
                "extracted": v.extracted,
                "correct": v.correct,
                "detail": v.detail,
                **p.meta,
            }
        )
    return _BenchmarkRun(
        summary=summarize([by_problem[pr.id] for pr in bench.problems]),
        records=records,
        seconds=time.monotonic() - start,
        generated_tokens=sum(len(o.token_ids) for o in outputs),
    )


def _slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"
    slug, n = base, 1
    while slug in taken:
        n += 1
        slug = f"{base}-{n}"
    taken.add(slug)
    return slug


def run(stage: EvalStage, ctx: StageContext) -> StageResult:
    """Evaluate ``stage.models`` on ``stage.benchmarks`` and publish to ``stage.output``."""
    start = time.monotonic()
    names = [b.name for b in stage.benchmarks]
    if len(set(names)) != len(names):
        raise StageInputError(f"benchmark names must be unique, got {names}")
    # Read and validate every dataset before loading any model: bad data fails in seconds.
    benchmarks = [load_benchmark(b, stage.storage) for b in stage.benchmarks]
    per_model = sum(len(b.problems) * b.config.samples for b in benchmarks)
    tracker = _Tracker(ctx, per_model * len(stage.models))
    out_dir = ctx.workdir / "eval-output"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "records").mkdir(parents=True)

    scores: list[Score] = []
    metrics: dict[str, float] = {}
    summary: dict[str, Any] = {"fingerprint": stage.fingerprint, "models": {}}
    if any(isinstance(b.task, CodeTask) for b in benchmarks):
        summary["sandbox"] = sandbox.describe()  # which confinement layers this host allowed
    taken: set[str] = set()
    generated_tokens = 0
    for display, ref in stage.models.items():
        model_dir = materialize_model(storage_for(ref.uri, stage.storage), ref.uri, ctx.cache_dir())
        log.info("eval: loading %s from %s", display, ref.uri)
        loaded = generate.load(model_dir, backend=stage.backend, batch_size=stage.batch_size)
        slug = _slug(display, taken)
        model_summary: dict[str, Any] = {"uri": ref.uri, "backend": loaded.generator.name, "benchmarks": {}}
        try:
            for bench in benchmarks:
                bench_run = evaluate_benchmark(loaded, bench, tracker)
                generated_tokens += bench_run.generated_tokens
                _write_jsonl(out_dir / "records" / slug / f"{bench.name}.jsonl", bench_run.records)
                s = bench_run.summary
                scores.append(
                    Score(
                        model=display,
                        benchmark=bench.name,
                        score=round(s.pass_at_1, 4),
                        samples=s.samples,
                        problems=s.problems,
                        mean_response_tokens=round(s.mean_response_tokens, 1),
                        truncated_fraction=round(s.truncated_fraction, 4),
                    )
                )
                for k, value in s.pass_at_k.items():
                    if k > 1:
                        metrics[f"{display}/{bench.name}/pass@{k}"] = round(value, 4)
                model_summary["benchmarks"][bench.name] = {
                    "records": f"records/{slug}/{bench.name}.jsonl",
                    "pass@k": {str(k): v for k, v in s.pass_at_k.items()},
                    "problems": s.problems,
                    "samples": s.samples,
                    "samples_per_problem": s.samples_per_problem,
                    "mean_response_tokens": s.mean_response_tokens,
                    "truncated_fraction": s.truncated_fraction,
                    "seconds": round(bench_run.seconds, 2),
                    "generated_tokens": bench_run.generated_tokens,
                    "settings": bench.config.dump(),
                }
                log.info("eval: %s on %s: pass@1 %.4f (%d samples)", display, bench.name, s.pass_at_1, s.samples)
        finally:
            loaded.generator.close()
        summary["models"][display] = model_summary
    elapsed = time.monotonic() - start
    metrics["eval_seconds"] = round(elapsed, 1)
    metrics["generated_tokens"] = float(generated_tokens)
    tracker.graded(0, force=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    result = StageResult(
        kind="Eval",
        status="Succeeded",
        fingerprint=stage.fingerprint,
        output=stage.output,
        metrics=metrics,
        scores=scores,
    )
    result = fit_result(result)
    ctx.storage.publish_dir(
        out_dir,
        stage.output,
        fingerprint=stage.fingerprint,
        stage="eval",
        metrics=result.metrics,
        extra={"scores": [s.dump() for s in result.scores]},
    )
    return result


def _size(result: StageResult) -> int:
    """Bytes of the untrimmed result (``to_json`` itself trims to fit)."""
    return len(json.dumps(result.dump(), separators=(",", ":")).encode())


def fit_result(result: StageResult) -> StageResult:
    """Keep the result under the termination-message limit: drop pass@k metrics first (they
    are in summary.json), then the optional per-score details. Scores themselves stay."""
    if _size(result) <= MAX_RESULT_BYTES:
        return result
    basic = {k: v for k, v in result.metrics.items() if "/" not in k}
    result = result.model_copy(update={"metrics": basic})
    if _size(result) <= MAX_RESULT_BYTES:
        return result
    slim = [Score(model=s.model, benchmark=s.benchmark, score=s.score, samples=s.samples) for s in result.scores]
    # Anything still too large is cut by StageResult.to_json, which counts the scores it
    # leaves out; failing a finished evaluation over the size of its summary would waste it.
    return result.model_copy(update={"scores": slim})


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
