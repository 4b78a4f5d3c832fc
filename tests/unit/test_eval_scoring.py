"""pass@1 averaged over samples, unbiased pass@k, length and truncation statistics."""

from __future__ import annotations

import itertools
from math import comb

import pytest
from hypothesis import given
from hypothesis import strategies as st

from branchmerge_trainer.evaluate.scoring import SampleOutcome, k_values, mean_pass_at_1, pass_at_k, summarize


def _o(correct: bool, tokens: int = 10, truncated: bool = False) -> SampleOutcome:
    return SampleOutcome(correct, tokens, truncated)


def test_pass_at_k_hand_cases() -> None:
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(16, 2, 8) == pytest.approx(1 - comb(14, 8) / comb(16, 8))


@given(n=st.integers(1, 8), data=st.data())
def test_pass_at_k_equals_the_fraction_of_k_subsets_with_a_correct_sample(n: int, data: st.DataObject) -> None:
    c = data.draw(st.integers(0, n))
    k = data.draw(st.integers(1, n))
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_pass_at_k_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_pass_at_1_is_averaged_over_samples_then_problems() -> None:
    outcomes = [
        [_o(True), _o(False), _o(False), _o(False)],  # 0.25
        [_o(True), _o(True), _o(True), _o(True)],  # 1.0
    ]
    assert mean_pass_at_1(outcomes) == pytest.approx(0.625)
    s = summarize(outcomes)
    assert s.pass_at_1 == pytest.approx(0.625)
    assert s.problems == 2 and s.samples == 8 and s.samples_per_problem == 4
    assert sorted(s.pass_at_k) == [1, 2, 4]
    assert s.pass_at_k[4] == pytest.approx(1.0)
    assert s.pass_at_k[2] == pytest.approx((0.5 + 1.0) / 2)


def test_lengths_and_truncation() -> None:
    s = summarize([[_o(True, 10), _o(False, 30, truncated=True)], [_o(False, 20), _o(False, 40, truncated=True)]])
    assert s.mean_response_tokens == pytest.approx(25.0)
    assert s.truncated_fraction == pytest.approx(0.5)


def test_k_values() -> None:
    assert k_values(1) == [1]
    assert k_values(4) == [1, 2, 4]
    assert k_values(16) == [1, 2, 4, 8, 16]
    assert k_values(6) == [1, 2, 4, 6]


def test_empty_benchmark_is_an_error() -> None:
    with pytest.raises(ValueError, match="no problems"):
        summarize([])
    with pytest.raises(ValueError, match="at least one"):
        summarize([[]])
