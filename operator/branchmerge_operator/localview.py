"""What `branchmerge run` / `status` / `demo` show: stage states with progress bars while a
run goes, then the results table (model × benchmark, with the gain over the student).

Rendering is a pure function of the `RunRecord`, so the live view, the final summary and
`branchmerge status DIR` (reading `state.json` later) print the same thing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from .local import RunRecord, StageRecord, log_tail

_STYLE = {
    "pending": ("·", "dim"),
    "cached": ("≡", "cyan"),
    "skipped": ("-", "dim"),
    "running": ("▶", "yellow"),
    "succeeded": ("✓", "green"),
    "failed": ("✗", "bold red"),
    "interrupted": ("‖", "magenta"),
    "blocked": ("⊘", "red"),
}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _elapsed(s: StageRecord, now: float) -> float | None:
    if s.started_at is None:
        return None
    return (s.finished_at or now) - s.started_at


def stage_table(record: RunRecord, now: float | None = None) -> Table:
    """One row per stage: state, a progress bar (step/total), loss, ETA, time taken."""
    now = time.time() if now is None else now
    table = Table(title=f"Distillation {record.distillation}", title_justify="left", expand=False)
    for col, just in (("stage", "left"), ("state", "left"), ("progress", "left"), ("step", "right"),
                      ("loss", "right"), ("ETA", "right"), ("time", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for s in record.stages:
        icon, style = _STYLE[s.state]
        p = s.progress
        bar: RenderableType = ""
        step = loss = eta = ""
        if p is not None and p.total_steps:
            done = s.state in {"succeeded", "cached"}
            bar = ProgressBar(total=p.total_steps, completed=p.total_steps if done else p.step, width=24)
            step = f"{p.step}/{p.total_steps}"
            loss = f"{p.loss:.3f}" if p.loss is not None else ""
            eta = _duration(p.eta_seconds) if s.state == "running" else ""
        elif s.state in {"succeeded", "cached"}:
            bar = ProgressBar(total=1, completed=1, width=24)
        elif s.state == "running":
            bar = Text("starting…", style="dim")
        table.add_row(
            s.name,
            Text(f"{icon} {s.state}", style=style),
            bar,
            step,
            loss,
            eta,
            _duration(_elapsed(s, now)),
        )
    return table


def _model_order(record: RunRecord, models: Sequence[str]) -> list[str]:
    """Student first, then the branches in plan order, then the merged model, then the rest."""
    branches = [s.name[len("branch-"):] for s in record.stages if s.kind == "SFT" and s.name.startswith("branch-")]
    rank = {"student": 0, **{b: 1 + i for i, b in enumerate(branches)}, "merged": 1 + len(branches)}
    return sorted(models, key=lambda m: (rank.get(m, 99), m))


def results_table(record: RunRecord) -> Table | None:
    """Model × benchmark pass@1 (%), each with its gain over the student when it was scored."""
    scores = record.scores()
    if not scores:
        return None
    benchmarks = list(dict.fromkeys(sc.benchmark for sc in scores))
    models = _model_order(record, list(dict.fromkeys(sc.model for sc in scores)))
    by = {(sc.model, sc.benchmark): sc.score for sc in scores}
    table = Table(title="pass@1 (%) — gain over the student in brackets", title_justify="left")
    table.add_column("model")
    for b in benchmarks:
        table.add_column(b, justify="right")
    for m in models:
        cells: list[RenderableType] = []
        for b in benchmarks:
            value = by.get((m, b))
            if value is None:
                cells.append("–")
                continue
            text = Text(f"{100 * value:.1f}")
            base = by.get(("student", b))
            if m != "student" and base is not None:
                gain = 100 * (value - base)
                style = "green" if gain > 0 else "red" if gain < 0 else "dim"
                text.append(f" ({gain:+.1f})", style=style)
            cells.append(text)
        table.add_row(m, *cells)
    return table


def results_markdown(record: RunRecord) -> str:
    """The results table as Markdown (for docs and the README)."""
    scores = record.scores()
    benchmarks = list(dict.fromkeys(sc.benchmark for sc in scores))
    models = _model_order(record, list(dict.fromkeys(sc.model for sc in scores)))
    by = {(sc.model, sc.benchmark): sc.score for sc in scores}
    lines = ["| model | " + " | ".join(benchmarks) + " |", "|---|" + "---:|" * len(benchmarks)]
    for m in models:
        cells = []
        for b in benchmarks:
            value, base = by.get((m, b)), by.get(("student", b))
            if value is None:
                cells.append("–")
            elif m == "student" or base is None:
                cells.append(f"{100 * value:.1f}")
            else:
                cells.append(f"{100 * value:.1f} ({100 * (value - base):+.1f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(record: RunRecord) -> RenderableType:
    """Stages, results, where the merged model is, and what went wrong (with log tails)."""
    parts: list[RenderableType] = [stage_table(record)]
    results = results_table(record)
    if results is not None:
        parts.append(results)
    merged = record.merged_model()
    if merged:
        parts.append(Text.assemble(("merged model: ", "bold"), merged))
    for s in record.stages:
        if s.kind == "Eval" and s.state in {"succeeded", "cached"}:
            parts.append(Text.assemble(("every answer: ", "bold"), f"{s.output}/records/<model>/<benchmark>.jsonl"))
    for s in record.failures():
        parts.append(Text.assemble((f"✗ {s.name} failed: ", "bold red"), s.reason or "unknown error"))
        if s.log_path:
            parts.append(Text(f"  log: {s.log_path} (last lines below)", style="dim"))
            for line in log_tail(Path(s.log_path)):
                parts.append(Text("  │ " + line, style="dim"))
    for s in record.stages:
        if s.state == "blocked":
            parts.append(Text(f"⊘ {s.name} not run: {s.reason}", style="red"))
    if record.status == "interrupted":
        parts.append(Text("interrupted: run the same command again to resume (training continues from its last checkpoint)", style="magenta"))
    parts.append(Text(f"run state: {Path(record.workdir) / 'state.json'}  (branchmerge status {record.workdir})", style="dim"))
    return Group(*parts)


class RunView:
    """The live view while a run goes: a redrawn table on a terminal, one line per change
    (and a progress line now and then) otherwise, so CI logs stay readable."""

    def __init__(self, console: Console, *, live: bool | None = None, progress_every: float = 15.0) -> None:
        self.console = console
        self.live_mode = console.is_terminal if live is None else live
        self._live: Live | None = None
        self._states: dict[str, str] = {}
        self._last_progress: dict[str, float] = {}
        self.progress_every = progress_every

    def __enter__(self) -> RunView:
        if self.live_mode:
            self._live = Live(console=self.console, refresh_per_second=4, transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.__exit__(et, ev, tb)
            self._live = None

    def update(self, record: RunRecord) -> None:
        if self._live is not None:
            self._live.update(stage_table(record))
            return
        now = time.monotonic()
        for s in record.stages:
            if self._states.get(s.name, "pending") != s.state:
                self._states[s.name] = s.state
                icon, _ = _STYLE[s.state]
                extra = f" ({s.reason})" if s.reason and s.state not in {"failed"} else ""
                self.console.print(f"{time.strftime('%H:%M:%S')} {icon} {s.name}: {s.state}{extra}", highlight=False)
                self._last_progress[s.name] = now
            elif s.state == "running" and s.progress and now - self._last_progress.get(s.name, 0) >= self.progress_every:
                self._last_progress[s.name] = now
                p = s.progress
                loss = f" loss {p.loss:.3f}" if p.loss is not None else ""
                eta = f" ETA {_duration(p.eta_seconds)}" if p.eta_seconds is not None else ""
                self.console.print(f"{time.strftime('%H:%M:%S')}   {s.name}: step {p.step}/{p.total_steps}{loss}{eta}", highlight=False)
