"""Benchmark files, row validation, presets, prompts and per-sample choice shuffling."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from branchmerge_trainer.evaluate.benchmarks import (
    BenchmarkError,
    CodeTask,
    MathTask,
    MultipleChoiceTask,
    Problem,
    load_benchmark,
    render,
)
from branchmerge_trainer.runtime import StageInputError
from branchmerge_trainer.stages import BenchmarkConfig, StorageConfig


def _jsonl(path: Path, rows: list[Any]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(uri: str, kind: str = "math", **kw: Any) -> BenchmarkConfig:
    return BenchmarkConfig.model_validate({"name": "bench", "uri": uri, "kind": kind, **kw})


def test_math_jsonl(tmp_path: Path) -> None:
    uri = _jsonl(tmp_path / "m.jsonl", [{"problem": "1+1?", "answer": "2"}, {"id": "p7", "problem": "2+2?", "answer": 4}])
    b = load_benchmark(_config(uri, samples=3))
    assert [p.id for p in b.problems] == ["0", "p7"]
    assert b.problems[1].fields == {"problem": "2+2?", "answer": "4"}
    prompts = b.prompts()
    assert [(p.id, p.sample) for p in prompts] == [("0", 0), ("0", 1), ("0", 2), ("p7", 0), ("p7", 1), ("p7", 2)]
    assert prompts[0].user == "1+1?\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert len({p.seed for p in prompts}) == 6  # every sample draws differently


def test_parquet_and_a_prefix_of_files(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist([{"problem": "a", "answer": "1"}]), d / "part-0.parquet")
    _jsonl(d / "part-1.jsonl", [{"problem": "b", "answer": "2"}])
    (d / "README.md").write_text("ignored")
    b = load_benchmark(_config(str(d)))
    assert [p.fields["problem"] for p in b.problems] == ["a", "b"]
    assert [p.id for p in b.problems] == ["0", "1"]


def test_max_problems(tmp_path: Path) -> None:
    uri = _jsonl(tmp_path / "m.jsonl", [{"problem": str(i), "answer": "1"} for i in range(10)])
    assert len(load_benchmark(_config(uri, maxProblems=3)).problems) == 3


def test_s3_benchmark(moto_s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same loader reads from S3 (moto's server), a file and a prefix."""
    for key, value in moto_s3.env().items():
        monkeypatch.setenv(key, value)
    bucket = moto_s3.create_bucket()
    client = moto_s3.client()
    client.put_object(Bucket=bucket, Key="bench/m.jsonl", Body=b'{"problem": "x", "answer": "1"}\n')
    client.put_object(Bucket=bucket, Key="bench/n.jsonl", Body=b'{"problem": "y", "answer": "2"}\n')
    storage_config = StorageConfig(endpoint=moto_s3.endpoint)
    b = load_benchmark(_config(f"s3://{bucket}/bench/m.jsonl"), storage_config)
    assert b.problems[0].fields["answer"] == "1"
    b = load_benchmark(_config(f"s3://{bucket}/bench"), storage_config)
    assert [p.fields["answer"] for p in b.problems] == ["1", "2"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kind", "row", "message"),
    [
        ("math", {"problem": "x"}, r"m\.jsonl row 1: field 'answer' is missing"),
        ("math", {"answer": "1"}, r"row 1: field 'problem' is missing"),
        ("math", {"problem": "x", "answer": "  "}, r"row 1: field 'answer' is empty"),
        ("math", {"problem": "x", "answer": [1]}, r"field 'answer' must be a string or number"),
        ("multiple_choice", {"question": "q", "choices": ["a", "b"]}, r"row 1: field 'answer' is missing"),
        ("multiple_choice", {"question": "q", "choices": ["a"], "answer": 0}, r"at least 2 options"),
        ("multiple_choice", {"question": "q", "choices": ["a", "b"], "answer": 5}, r"index 5 is out of range"),
        ("multiple_choice", {"question": "q", "choices": ["a", "b"], "answer": "zebra"}, r"not a choice"),
        ("code", {"question": "q"}, r"row 1: field 'tests' is missing"),
        ("code", {"question": "q", "tests": []}, r"non-empty list"),
        ("code", {"question": "q", "tests": [{"input": "1"}]}, r"tests\[0\] must be an object with 'input' and 'output'"),
        ("code", {"question": "q", "tests": "assert True", "entry_point": "not an id"}, r"entry_point"),
    ],
)
def test_bad_rows_name_file_row_and_field(tmp_path: Path, kind: str, row: dict[str, Any], message: str) -> None:
    good = {
        "math": {"problem": "ok", "answer": "1"},
        "multiple_choice": {"question": "ok", "choices": ["a", "b"], "answer": 0},
        "code": {"question": "ok", "tests": [{"input": "", "output": ""}]},
    }[kind]
    uri = _jsonl(tmp_path / "m.jsonl", [good, row])
    with pytest.raises(BenchmarkError, match=message):
        load_benchmark(_config(uri, kind))


def test_bad_input_is_a_stage_input_error(tmp_path: Path) -> None:
    """runtime reports StageInputError as reason InvalidInput."""
    assert issubclass(BenchmarkError, StageInputError)


def test_empty_dataset(tmp_path: Path) -> None:
    uri = _jsonl(tmp_path / "m.jsonl", [])
    with pytest.raises(BenchmarkError, match="no problems"):
        load_benchmark(_config(uri))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkError, match="not found"):
        load_benchmark(_config(str(tmp_path / "nope.jsonl")))


def test_directory_without_data_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(BenchmarkError, match="holds no"):
        load_benchmark(_config(str(tmp_path)))


def test_invalid_json_line(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_text('{"problem": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(BenchmarkError, match=r"line 2: not valid JSON"):
        load_benchmark(_config(str(p)))


def test_duplicate_ids(tmp_path: Path) -> None:
    uri = _jsonl(tmp_path / "m.jsonl", [{"id": 1, "problem": "a", "answer": "1"}, {"id": 1, "problem": "b", "answer": "2"}])
    with pytest.raises(BenchmarkError, match="duplicate id '1'"):
        load_benchmark(_config(uri))


def test_unknown_kind_is_rejected_with_the_choices() -> None:
    with pytest.raises(ValidationError, match="'math', 'multiple_choice' or 'code'"):
        _config("/data/x.jsonl", "essay")


def test_prompt_without_the_problem_is_rejected(tmp_path: Path) -> None:
    uri = _jsonl(tmp_path / "m.jsonl", [{"problem": "a", "answer": "1"}])
    with pytest.raises(BenchmarkError, match=r"must contain \{problem\}"):
        load_benchmark(_config(uri, prompt="Solve it."))
    uri = _jsonl(tmp_path / "c.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    with pytest.raises(BenchmarkError, match=r"\{choices\}"):
        load_benchmark(_config(uri, "multiple_choice", prompt="{question}"))


# --------------------------------------------------------------------------- presets


def test_presets_fill_only_unset_fields(tmp_path: Path) -> None:
    uri = _jsonl(tmp_path / "m.jsonl", [{"problem": "a", "answer": "1"}])
    b = load_benchmark(_config(uri, preset="aime2024"))
    c = b.config
    assert (c.samples, c.temperature, c.top_p, c.max_new_tokens) == (16, 0.6, 0.95, 32768)
    b = load_benchmark(_config(uri, preset="aime2024", samples=2, temperature=0.0))
    assert (b.config.samples, b.config.temperature) == (2, 0.0)


@pytest.mark.parametrize(("preset", "kind", "samples"), [("gpqa_diamond", "multiple_choice", 4), ("livecodebench", "code", 4)])
def test_other_presets(tmp_path: Path, preset: str, kind: str, samples: int) -> None:
    row = {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 0, "tests": "assert True"}
    uri = _jsonl(tmp_path / "x.jsonl", [row])
    assert load_benchmark(_config(uri, kind, preset=preset)).config.samples == samples


def test_preset_of_another_kind_is_an_error(tmp_path: Path) -> None:
    uri = _jsonl(tmp_path / "m.jsonl", [{"problem": "a", "answer": "1"}])
    with pytest.raises(BenchmarkError, match="preset 'gpqa_diamond' is a multiple_choice benchmark"):
        load_benchmark(_config(uri, "math", preset="gpqa_diamond"))


# --------------------------------------------------------------------------- multiple choice


def test_choices_are_shuffled_per_sample_reproducibly(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "choices": ["right", "w1", "w2", "w3"], "answer": "right"} for i in range(50)]
    uri = _jsonl(tmp_path / "mc.jsonl", rows)
    prompts = load_benchmark(_config(uri, "multiple_choice", samples=4, seed=7)).prompts()
    again = load_benchmark(_config(uri, "multiple_choice", samples=4, seed=7)).prompts()
    other = load_benchmark(_config(uri, "multiple_choice", samples=4, seed=8)).prompts()
    assert [p.meta for p in prompts] == [p.meta for p in again]
    assert [p.meta for p in prompts] != [p.meta for p in other]
    golds = Counter(p.meta["gold"] for p in prompts)
    assert set(golds) == set("ABCD") and min(golds.values()) > 25  # ~50 each of 200
    p = prompts[0]
    line = next(line for line in p.user.splitlines() if line.endswith(") right"))
    assert line[0] == p.meta["gold"]
    assert "one of A, B, C, D" in p.user


def test_gpqa_native_columns(tmp_path: Path) -> None:
    row = {"Question": "q", "Correct Answer": "yes", "Incorrect Answer 1": "n1", "Incorrect Answer 2": "n2", "Incorrect Answer 3": "n3"}
    b = load_benchmark(_config(_jsonl(tmp_path / "g.jsonl", [row]), "multiple_choice"))
    assert b.problems[0].fields == {"question": "q", "choices": ["yes", "n1", "n2", "n3"], "answer_index": 0}


@pytest.mark.parametrize(("answer", "index"), [(2, 2), ("C", 2), ("c", 2), ("gamma", 2)])
def test_answer_as_index_letter_or_text(tmp_path: Path, answer: Any, index: int) -> None:
    row = {"question": "q", "choices": ["alpha", "beta", "gamma", "delta"], "answer": answer}
    b = load_benchmark(_config(_jsonl(tmp_path / "m.jsonl", [row]), "multiple_choice"))
    assert b.problems[0].fields["answer_index"] == index


def test_grading_per_kind() -> None:
    math = MathTask()
    p = Problem("1", {"problem": "x", "answer": "\\frac{1}{2}"})
    assert math.grade(p, {}, "<think>\\boxed{3}</think>so \\boxed{0.5}", False).correct
    v = math.grade(p, {}, "<think>\\boxed{0.5}</think>", False)
    assert not v.correct and v.extracted is None

    mc = MultipleChoiceTask()
    q = Problem("1", {"question": "q", "choices": ["a", "b", "c", "d"], "answer_index": 0})
    assert mc.grade(q, {"gold": "C"}, "Answer: C", False).correct
    assert not mc.grade(q, {"gold": "C"}, "Answer: A", False).correct

    code = CodeTask(timeout=2)
    c = Problem("1", {"tests": [{"input": "3\n", "output": "9\n"}], "entry_point": None, "starter_code": ""})
    assert code.grade(c, {}, "</think>```python\nn = int(input())\nprint(n * n)\n```", False).correct
    assert not code.grade(c, {}, "</think>no code here", False).correct


def test_render_leaves_other_braces_alone() -> None:
    assert render("{problem} in \\boxed{} or {x}", {"problem": "P"}) == "P in \\boxed{} or {x}"
