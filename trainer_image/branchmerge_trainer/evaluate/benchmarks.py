"""Benchmarks as data: a dataset URI, a kind, and the protocol to prompt and grade it.

A benchmark file is JSONL (or a JSON array) or Parquet, local or in S3, or a prefix holding
several such files. Each row is one problem, checked up front so a bad row fails the stage
before any model is loaded, with an error naming the file, the row and the field:

* ``math``: ``{problem, answer}`` — the response's last ``\\boxed{}`` after ``</think>`` must
  equal ``answer`` by math-verify.
* ``multiple_choice``: ``{question, choices: [...], answer}`` — ``answer`` is the correct
  choice's index, letter or text. Choices are shuffled per sample with a seeded RNG (the
  GPQA protocol: a model cannot score by always picking one position). GPQA's own columns
  (``Question``, ``Correct Answer``, ``Incorrect Answer 1..3``) are accepted as well.
* ``code``: ``{question, tests, entry_point?, starter_code?}`` — ``tests`` is a list of
  ``{input, output}`` (stdin/stdout, or a function's JSON arguments/result when
  ``entry_point`` is given) or a string of test code (asserts, or ``check(candidate)`` run
  on ``entry_point``). The last fenced program after ``</think>`` must pass every test in
  the sandbox.

An optional ``id`` field names a problem in the records (default: its row number).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..runtime import StageInputError
from ..stages import BenchmarkConfig, StorageConfig
from ..storage import Storage, storage_for
from . import answers
from .sandbox import SandboxLimits, run_program


class BenchmarkError(StageInputError):
    """A benchmark's data or settings are unusable; the message says where and why."""


@dataclass(frozen=True)
class Problem:
    id: str
    fields: dict[str, Any]  # normalised per kind


@dataclass(frozen=True)
class Prompt:
    """One (problem, sample) to generate: the chat turn plus what grading needs."""

    problem: Problem
    sample: int
    user: str
    system: str | None
    seed: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.problem.id


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None
    detail: str = ""


def stable_seed(*parts: object) -> int:
    """A seed from values, stable across processes (``hash()`` of a str is salted per run)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


_PLACEHOLDER = re.compile(r"\{(problem|question|choices|letters|instructions|entry_point|starter_code)\}")


def render(template: str, values: dict[str, str]) -> str:
    """Fill ``{name}`` placeholders; other braces (``\\boxed{}``, code) stay as written."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def _pick(row: dict[str, Any], names: Sequence[str]) -> Any:
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    return None


# --------------------------------------------------------------------------- kinds


class Task(ABC):
    """How one kind of benchmark reads rows, writes prompts and grades responses."""

    kind: ClassVar[str]
    default_prompt: ClassVar[str]

    @abstractmethod
    def normalize(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        """The row's fields this kind needs, validated; raise BenchmarkError naming ``where``."""

    def check_template(self, template: str, name: str) -> None:
        if "{problem}" not in template and "{question}" not in template:
            raise BenchmarkError(f"benchmark {name!r}: prompt must contain {{problem}} or {{question}}")

    def sample_meta(self, problem: Problem, sample: int, seed: int) -> dict[str, Any]:
        return {}

    @abstractmethod
    def user_message(self, template: str, problem: Problem, meta: dict[str, Any]) -> str: ...

    @abstractmethod
    def grade(self, problem: Problem, meta: dict[str, Any], response: str, thinking_open: bool) -> Verdict: ...

    def grade_many(
        self, items: Sequence[tuple[Problem, dict[str, Any], str, bool]], progress: Callable[[int], None] | None = None
    ) -> list[Verdict]:
        """Grade in the calling thread (math-verify's timeouts rely on signals)."""
        out = []
        for problem, meta, response, thinking_open in items:
            out.append(self.grade(problem, meta, response, thinking_open))
            if progress is not None:
                progress(1)
        return out


def _text(value: Any, where: str, name: str) -> str:
    if value is None:
        raise BenchmarkError(f"{where}: field {name!r} is missing")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BenchmarkError(f"{where}: field {name!r} must be a string or number, got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        raise BenchmarkError(f"{where}: field {name!r} is empty")
    return text


class MathTask(Task):
    kind = "math"
    default_prompt = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}."

    def normalize(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        problem = _text(_pick(row, ("problem", "question", "Problem", "Question")), where, "problem")
        answer = _text(_pick(row, ("answer", "Answer", "expected_answer")), where, "answer")
        return {"problem": problem, "answer": answer}

    def user_message(self, template: str, problem: Problem, meta: dict[str, Any]) -> str:
        text = problem.fields["problem"]
        return render(template, {"problem": text, "question": text})

    def __init__(self) -> None:
        self._gold: dict[str, list[Any]] = {}  # parsed reference answers, by problem id

    def grade(self, problem: Problem, meta: dict[str, Any], response: str, thinking_open: bool) -> Verdict:
        extracted = answers.extract_math_answer(response, thinking_open=thinking_open)
        if extracted is None:
            return Verdict(False, None, "no \\boxed{} answer after </think>")
        if problem.id not in self._gold:
            self._gold[problem.id] = answers.parse_gold(problem.fields["answer"])
        gold = self._gold[problem.id]
        if not gold:  # math-verify cannot parse the reference: fall back to exact text
            return Verdict(answers.math_equal(problem.fields["answer"], extracted), extracted, "string match")
        return Verdict(answers.math_equal(gold, extracted), extracted)


class MultipleChoiceTask(Task):
    kind = "multiple_choice"
    default_prompt = (
        "Answer the following multiple choice question. Think step by step before answering. "
        "The last line of your response must be of the form 'Answer: X' where X is one of {letters}.\n\n"
        "{question}\n\n{choices}"
    )

    def normalize(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        question = _text(_pick(row, ("question", "Question", "problem")), where, "question")
        if "Correct Answer" in row and "choices" not in row:  # GPQA's own columns
            wrong = [row[k] for k in sorted(row) if k.startswith("Incorrect Answer")]
            choices_raw: Any = [row["Correct Answer"], *wrong]
            answer: Any = 0
        else:
            choices_raw = _pick(row, ("choices", "options"))
            answer = _pick(row, ("answer", "Answer", "label"))
        if not isinstance(choices_raw, list | tuple) or len(choices_raw) < 2:
            raise BenchmarkError(f"{where}: field 'choices' must be a list of at least 2 options")
        choices = [_text(c, where, f"choices[{i}]").strip() for i, c in enumerate(choices_raw)]
        if len(choices) > 26:
            raise BenchmarkError(f"{where}: at most 26 choices are supported, got {len(choices)}")
        if answer is None:
            raise BenchmarkError(f"{where}: field 'answer' is missing (index, letter or text of the correct choice)")
        return {"question": question, "choices": choices, "answer_index": self._answer_index(answer, choices, where)}

    @staticmethod
    def _answer_index(answer: Any, choices: list[str], where: str) -> int:
        if isinstance(answer, bool):
            raise BenchmarkError(f"{where}: field 'answer' must be an index, a letter or a choice's text")
        if isinstance(answer, int):
            if 0 <= answer < len(choices):
                return answer
            raise BenchmarkError(f"{where}: answer index {answer} is out of range for {len(choices)} choices")
        text = str(answer).strip()
        if text in choices:
            return choices.index(text)
        letters = answers.choice_letters(len(choices))
        if len(text) == 1 and text.upper() in letters:
            return letters.index(text.upper())
        raise BenchmarkError(f"{where}: answer {text[:60]!r} is not a choice, a letter {letters[0]}–{letters[-1]} or an index")

    def check_template(self, template: str, name: str) -> None:
        super().check_template(template, name)
        if "{choices}" not in template:
            raise BenchmarkError(f"benchmark {name!r}: a multiple-choice prompt must contain {{choices}}")

    def sample_meta(self, problem: Problem, sample: int, seed: int) -> dict[str, Any]:
        import random

        n = len(problem.fields["choices"])
        order = list(range(n))
        random.Random(stable_seed("choices", seed, problem.id, sample)).shuffle(order)
        gold = answers.choice_letters(n)[order.index(problem.fields["answer_index"])]
        return {"order": order, "gold": gold}

    def user_message(self, template: str, problem: Problem, meta: dict[str, Any]) -> str:
        choices = problem.fields["choices"]
        letters = answers.choice_letters(len(choices))
        listed = "\n".join(f"{letters[i]}) {choices[j]}" for i, j in enumerate(meta["order"]))
        q = problem.fields["question"]
        return render(template, {"question": q, "problem": q, "choices": listed, "letters": ", ".join(letters)})

    def grade(self, problem: Problem, meta: dict[str, Any], response: str, thinking_open: bool) -> Verdict:
        letter = answers.extract_choice(response, len(problem.fields["choices"]), thinking_open=thinking_open)
        if letter is None:
            return Verdict(False, None, "no answer letter after </think>")
        return Verdict(letter == meta["gold"], letter)


_STDIN_INSTRUCTIONS = (
    "Write a complete Python 3 program that reads the input from standard input and writes the answer "
    "to standard output. Put the final program in a single ```python code block."
)
_FUNCTION_INSTRUCTIONS = "Complete the following code and put the final solution in a single ```python code block."

#: Appended to a functional (``entry_point``) solution: call it on JSON arguments read from
#: stdin, one per line, and print the JSON result. Names start with ``_bm_`` to stay clear
#: of the solution's own.
_FUNCTION_HARNESS = """

if True:
    import json as _bm_json, sys as _bm_sys
    _bm_args = [_bm_json.loads(_l) for _l in _bm_sys.stdin.read().splitlines() if _l.strip()]
    _bm_f = globals().get({name!r})
    if _bm_f is None and "Solution" in globals():
        _bm_f = getattr(Solution(), {name!r})
    print(_bm_json.dumps(_bm_f(*_bm_args)))
"""


class CodeTask(Task):
    kind = "code"
    default_prompt = "{question}\n\n{instructions}"

    def __init__(self, timeout: float = 10.0, workers: int | None = None) -> None:
        self.limits = SandboxLimits(wall_seconds=timeout)
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))

    def normalize(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        question = _text(_pick(row, ("question", "question_content", "problem", "prompt")), where, "question")
        entry = _pick(row, ("entry_point", "func_name"))
        if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
            raise BenchmarkError(f"{where}: field 'entry_point' must be a Python identifier, got {entry!r}")
        starter = _pick(row, ("starter_code",)) or ""
        tests = _pick(row, ("tests", "test", "test_cases", "public_test_cases"))
        if tests is None:
            raise BenchmarkError(f"{where}: field 'tests' is missing (a list of {{input, output}} or test code)")
        if isinstance(tests, str) and tests.lstrip().startswith("["):
            try:
                tests = json.loads(tests)
            except ValueError as e:
                raise BenchmarkError(f"{where}: field 'tests' looks like JSON but does not parse: {e}") from e
        if isinstance(tests, str):
            if not tests.strip():
                raise BenchmarkError(f"{where}: field 'tests' is empty")
            return {"question": question, "tests": tests, "entry_point": entry, "starter_code": starter}
        if not isinstance(tests, list | tuple) or not tests:
            raise BenchmarkError(f"{where}: field 'tests' must be a non-empty list of {{input, output}} or test code")
        cases = []
        for i, t in enumerate(tests):
            if not isinstance(t, dict) or "input" not in t or "output" not in t:
                raise BenchmarkError(f"{where}: tests[{i}] must be an object with 'input' and 'output'")
            cases.append({"input": str(t["input"]), "output": str(t["output"])})
        return {"question": question, "tests": cases, "entry_point": entry, "starter_code": starter}

    def user_message(self, template: str, problem: Problem, meta: dict[str, Any]) -> str:
        f = problem.fields
        if f["entry_point"]:
            starter = f["starter_code"] or f"def {f['entry_point']}(...):"
            instructions = f"{_FUNCTION_INSTRUCTIONS}\n```python\n{starter}\n```"
        else:
            instructions = _STDIN_INSTRUCTIONS
        values = {
            "question": f["question"],
            "problem": f["question"],
            "instructions": instructions,
            "entry_point": f["entry_point"] or "",
            "starter_code": f["starter_code"],
        }
        return render(template, values)

    def grade(self, problem: Problem, meta: dict[str, Any], response: str, thinking_open: bool) -> Verdict:
        program = answers.extract_program(response, thinking_open=thinking_open)
        if program is None:
            return Verdict(False, None, "no ```python code block after </think>")
        ok, detail = run_tests(program, problem.fields, self.limits)
        return Verdict(ok, program, detail)

    def grade_many(
        self, items: Sequence[tuple[Problem, dict[str, Any], str, bool]], progress: Callable[[int], None] | None = None
    ) -> list[Verdict]:
        """Programs run in parallel (each test still in its own sandbox); identical programs
        for one problem — common with greedy decoding — run once."""
        cache: dict[tuple[str, str], Verdict] = {}

        def one(item: tuple[Problem, dict[str, Any], str, bool]) -> Verdict:
            problem, meta, response, thinking_open = item
            program = answers.extract_program(response, thinking_open=thinking_open)
            key = (problem.id, program or "")
            if key not in cache:
                cache[key] = self.grade(problem, meta, response, thinking_open)
            if progress is not None:
                progress(1)
            return cache[key]

        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(one, items))


def run_tests(program: str, fields: dict[str, Any], limits: SandboxLimits) -> tuple[bool, str]:
    """Run a program against a problem's tests, stopping at the first failure."""
    tests, entry = fields["tests"], fields["entry_point"]
    if isinstance(tests, str):
        source = f"{program}\n\n{tests}\n"
        if entry and re.search(r"^def check\(", tests, re.M):
            source += f"\ncheck({entry})\n"
        r = run_program(source, "", limits)
        return r.ok, "passed" if r.ok else f"{r.status}: {_last_line(r.stderr)}"
    source = program + (_FUNCTION_HARNESS.format(name=entry) if entry else "")
    compare = answers.json_outputs_match if entry else answers.outputs_match
    for i, case in enumerate(tests):
        r = run_program(source, case["input"], limits)
        if not r.ok:
            return False, f"test {i}: {r.status}: {_last_line(r.stderr)}"
        if not compare(case["output"], r.stdout):
            return False, f"test {i}: wrong answer"
    return True, f"passed {len(tests)} tests"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


TASKS: dict[str, Callable[[BenchmarkConfig], Task]] = {
    "math": lambda c: MathTask(),
    "multiple_choice": lambda c: MultipleChoiceTask(),
    "code": lambda c: CodeTask(timeout=c.code_timeout_seconds),
}


# --------------------------------------------------------------------------- loading


def resolve_config(config: BenchmarkConfig) -> BenchmarkConfig:
    """Apply the preset (unset sampling fields take the paper's protocol) and check that the
    preset's kind matches."""
    from ..stages import BENCHMARK_PRESETS

    if config.preset is not None:
        kind = BENCHMARK_PRESETS[config.preset]["kind"]
        if config.kind != kind:
            raise BenchmarkError(
                f"benchmark {config.name!r}: preset {config.preset!r} is a {kind} benchmark, but kind is {config.kind!r}"
            )
    return config.with_preset()


@dataclass
class Benchmark:
    config: BenchmarkConfig
    task: Task
    problems: list[Problem]

    @property
    def name(self) -> str:
        return self.config.name

    def prompts(self) -> list[Prompt]:
        """Problem-major, sample-minor: every problem gets ``samples`` prompts."""
        c = self.config
        template = c.prompt or self.task.default_prompt
        out = []
        for problem in self.problems:
            for s in range(c.samples):
                meta = self.task.sample_meta(problem, s, c.seed)
                out.append(
                    Prompt(
                        problem=problem,
                        sample=s,
                        user=self.task.user_message(template, problem, meta),
                        system=c.system_prompt,
                        seed=stable_seed("sample", c.seed, c.name, problem.id, s),
                        meta=meta,
                    )
                )
        return out


def load_benchmark(config: BenchmarkConfig, storage_config: StorageConfig | None = None) -> Benchmark:
    """Read and validate a benchmark's rows (fails before any model is loaded)."""
    if config.kind not in TASKS:
        raise BenchmarkError(f"benchmark {config.name!r}: unknown kind {config.kind!r}; use one of {sorted(TASKS)}")
    config = resolve_config(config)
    task = TASKS[config.kind](config)
    task.check_template(config.prompt or task.default_prompt, config.name)
    storage = storage_for(config.uri, storage_config)
    problems: list[Problem] = []
    seen: set[str] = set()
    for where, index, row in read_rows(storage, config.uri, config.name):
        if config.max_problems is not None and len(problems) >= config.max_problems:
            break
        if not isinstance(row, dict):
            raise BenchmarkError(f"{where}: a row must be an object, got {type(row).__name__}")
        pid = str(row["id"]) if row.get("id") is not None else str(index)
        if pid in seen:
            raise BenchmarkError(f"{where}: duplicate id {pid!r}")
        seen.add(pid)
        problems.append(Problem(id=pid, fields=task.normalize(row, where)))
    if not problems:
        raise BenchmarkError(f"benchmark {config.name!r}: {config.uri} has no problems (empty dataset)")
    return Benchmark(config=config, task=task, problems=problems)


_EXTENSIONS = (".jsonl", ".json", ".parquet")


def read_rows(storage: Storage, uri: str, name: str) -> list[tuple[str, int, Any]]:
    """``(where, index, row)`` of every row of a file or of every data file under a prefix."""
    files = [uri]
    if not uri.endswith(_EXTENSIONS):
        listed = [o.key for o in storage.list(uri) if o.key]
        if listed:  # a prefix (directory): every data file under it, in order
            files = [f"{uri.rstrip('/')}/{k}" for k in listed if k.endswith(_EXTENSIONS)]
            if not files:
                raise BenchmarkError(f"benchmark {name!r}: {uri} holds no {'/'.join(_EXTENSIONS)} files")
    rows: list[tuple[str, int, Any]] = []
    for f in files:
        try:
            data = storage.read_bytes(f)
        except (FileNotFoundError, IsADirectoryError) as e:
            raise BenchmarkError(f"benchmark {name!r}: {f} not found") from e
        for i, row in enumerate(_parse(data, f)):
            rows.append((f"{f} row {i}", len(rows), row))
    return rows


def _parse(data: bytes, uri: str) -> list[Any]:
    if uri.endswith(".parquet") or data[:4] == b"PAR1":
        import pyarrow.parquet as pq

        try:
            return list(pq.read_table(io.BytesIO(data)).to_pylist())
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise BenchmarkError(f"{uri}: not a readable Parquet file ({e})") from e
    text = data.decode("utf-8-sig", errors="strict")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise BenchmarkError(f"{uri}: not valid JSON ({e})") from e
        return list(rows)
    out = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{uri} line {line_no}: not valid JSON ({e.msg})") from e
    return out
