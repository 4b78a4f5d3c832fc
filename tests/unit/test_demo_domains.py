"""The demo's synthetic domains: deterministic, disjoint train/benchmark prompts, and every
teacher answer graded correct by the eval stage's own checkers (sandbox included)."""

from __future__ import annotations

import operator
from typing import Any

import pytest

from branchmerge_trainer.demo import prompts
from branchmerge_trainer.demo.domains import Difficulty, Domain, make_domains
from branchmerge_trainer.evaluate import answers
from branchmerge_trainer.evaluate.benchmarks import TASKS, Problem, Task
from branchmerge_trainer.stages import BenchmarkConfig

TEMPLATES = {"math": prompts.MATH_TEMPLATE, "code": prompts.CODE_TEMPLATE, "multiple_choice": prompts.MC_TEMPLATE}


@pytest.fixture(scope="module", params=["listing", "checks"])
def domains(request: pytest.FixtureRequest) -> list[Domain]:
    """Both science teachers (the quick start's demo uses "checks")."""
    difficulty = Difficulty(science_reasoning=request.param, math_fact_repeats=2)
    return make_domains(seed=0, n_train=40, n_bench=12, difficulty=difficulty)


def _task(kind: str) -> Task:
    return TASKS[kind](BenchmarkConfig(name="t", uri="file:///x", kind=kind))  # type: ignore[arg-type]


def _identity_meta(task: Task, problem: Problem) -> dict[str, Any]:
    """Choices in the order given (the rows store them as the teacher saw them)."""
    if "choices" not in problem.fields:
        return {}
    n = len(problem.fields["choices"])
    return {"order": list(range(n)), "gold": answers.choice_letters(n)[problem.fields["answer_index"]]}


def test_same_seed_same_data_other_seed_other_data() -> None:
    a, b, c = make_domains(0, 30, 5), make_domains(0, 30, 5), make_domains(1, 30, 5)
    for x, y, z in zip(a, b, c, strict=True):
        assert (x.train, x.bench, x.corpus, x.warmup) == (y.train, y.bench, y.corpus, y.warmup)
        assert x.train != z.train and x.bench != z.bench


def test_sizes_kinds_and_reasoning_markup(domains: list[Domain]) -> None:
    assert [(d.name, d.kind) for d in domains] == [("math", "math"), ("code", "code"), ("science", "multiple_choice")]
    for d in domains:
        assert len(d.train) == len(d.train_rows) == 40
        assert len(d.bench) == len(d.bench_solutions) == 12
        assert d.corpus and len(d.warmup) == 4
        for chat in d.train:
            user, assistant = chat["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert assistant["content"].startswith("<think>") and "</think>" in assistant["content"]


def test_benchmark_prompts_never_occur_in_training(domains: list[Domain]) -> None:
    for d in domains:
        key = "problem" if d.kind == "math" else "question"
        train = {r[key] for r in d.train_rows}
        bench = {r[key] for r in d.bench}
        warmup = {c["messages"][0]["content"] for c in d.warmup}
        assert not train & bench, d.name
        assert not any(b in w for b in bench | train for w in warmup), d.name


def test_teacher_is_graded_correct_by_the_eval_checkers(domains: list[Domain]) -> None:
    for d in domains:
        task = _task(d.kind)
        pairs = [(r, c["messages"][1]["content"], c["messages"][0]["content"]) for r, c in zip(d.train_rows, d.train, strict=True)]
        pairs += [(r, s, None) for r, s in zip(d.bench, d.bench_solutions, strict=True)]
        for i, (row, response, user) in enumerate(pairs):
            problem = Problem(str(i), task.normalize(row, f"{d.name} row {i}"))
            meta = _identity_meta(task, problem)
            verdict = task.grade(problem, meta, response, False)
            assert verdict.correct, (d.name, row, response, verdict)
            if user is not None:  # the teacher was asked exactly what the eval will ask
                assert user == task.user_message(TEMPLATES[d.kind], problem, meta)


def test_wrong_answers_are_graded_wrong(domains: list[Domain]) -> None:
    """The checkers discriminate on this data (a benchmark everyone passes measures nothing)."""
    math, code, science = domains
    row, good = math.bench[0], math.bench_solutions[0]
    task = _task("math")
    problem = Problem("0", task.normalize(row, "math"))
    wrong = good.replace(f"\\boxed{{{row['answer']}}}", f"\\boxed{{{int(row['answer']) + 1}}}")
    assert not task.grade(problem, {}, wrong, False).correct
    ctask = _task("code")
    cproblem = Problem("0", ctask.normalize(code.bench[0], "code"))
    assert not ctask.grade(cproblem, {}, "```python\nprint(input())\n```", False).correct
    stask = _task("multiple_choice")
    sproblem = Problem("0", stask.normalize(science.bench[0], "science"))
    meta = _identity_meta(stask, sproblem)
    other = next(x for x in "ABCD" if x != meta["gold"])
    assert not stask.grade(sproblem, meta, f"<think></think>\nThe answer is {other}.", False).correct


_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def test_math_answers_match_an_independent_evaluation(domains: list[Domain]) -> None:
    for row in domains[0].train_rows + domains[0].bench:
        tokens = row["problem"].removeprefix("Compute from left to right: ").rstrip(".").split()
        value = int(tokens[0])
        for op, n in zip(tokens[1::2], tokens[2::2], strict=True):
            value = _OPS[op](value, int(n))
        assert str(value) == row["answer"]


def test_science_choices_are_distinct_and_contain_the_answer(domains: list[Domain]) -> None:
    for row in domains[2].train_rows + domains[2].bench:
        assert len(set(row["choices"])) == 4 and row["answer"] in row["choices"]
        assert row["answer"] in row["question"]  # answerable from the facts given
