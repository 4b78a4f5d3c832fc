"""Aggregate per-sample verdicts into benchmark scores. Pure arithmetic, no I/O.

The paper reports pass@1 *averaged over N sampled responses* per problem (16 for AIME,
4 for GPQA and LiveCodeBench): with temperature 0.6 a single sample per problem is too noisy
to compare checkpoints that differ by a point or two. With N samples drawn we also report the
unbiased pass@k estimator (Chen et al., 2021) for k ≤ N.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is correct) from n samples, c correct.

    ``1 - C(n-c, k) / C(n, k)``: the chance that a random k-subset of the n drawn samples
    contains a correct one. Raises for k > n (the estimate needs at least k samples).
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= correct <= samples, got correct={c}, samples={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= samples ({n})")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def k_values(n: int) -> list[int]:
    """The k reported for n samples per problem: 1, powers of two below n, and n itself."""
    ks = [1]
    k = 2
    while k < n:
        ks.append(k)
        k *= 2
    if n > 1:
        ks.append(n)
    return ks


@dataclass(frozen=True)
class SampleOutcome:
    """What scoring needs from one response."""

    correct: bool
    response_tokens: int
    truncated: bool


@dataclass(frozen=True)
class BenchmarkSummary:
    problems: int
    samples: int
    samples_per_problem: int
    pass_at_1: float
    pass_at_k: dict[int, float] = field(default_factory=dict)
    mean_response_tokens: float = 0.0
    truncated_fraction: float = 0.0


def summarize(outcomes: Sequence[Sequence[SampleOutcome]]) -> BenchmarkSummary:
    """Scores of one model on one benchmark from ``outcomes[problem][sample]``.

    pass@1 is the mean over problems of (correct samples / samples), i.e. pass@1 averaged over
    samples; pass@k is reported for the k in :func:`k_values` of the smallest per-problem count.
    """
    if not outcomes:
        raise ValueError("cannot score a benchmark with no problems")
    counts = [len(row) for row in outcomes]
    if min(counts) == 0:
        raise ValueError("every problem needs at least one scored sample")
    flat = [o for row in outcomes for o in row]
    n_min = min(counts)
    ks = {k: sum(pass_at_k(len(row), sum(o.correct for o in row), k) for row in outcomes) / len(outcomes)
          for k in k_values(n_min)}
    return BenchmarkSummary(
        problems=len(outcomes),
        samples=len(flat),
        samples_per_problem=n_min,
        pass_at_1=mean_pass_at_1(outcomes),
        pass_at_k=ks,
        mean_response_tokens=sum(o.response_tokens for o in flat) / len(flat),
        truncated_fraction=sum(o.truncated for o in flat) / len(flat),
    )


def mean_pass_at_1(outcomes: Sequence[Sequence[SampleOutcome]]) -> float:
    """pass@1 averaged over samples, then over problems (each problem weighs the same)."""
    return sum(sum(o.correct for o in row) / len(row) for row in outcomes) / len(outcomes)
