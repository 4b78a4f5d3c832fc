"""Three small, verifiable synthetic domains that stand in for math, code and science.

Each domain yields (a) teacher trajectories — chats whose assistant turn reasons inside
``<think>…</think>`` and then answers in the form the eval stage checks, (b) benchmark rows in
the eval stage's formats, and (c) plain text for the student's general pre-training. The
"teacher" is procedural: it knows the answer because it computed it, so every trajectory is
correct by construction (the tests re-check them with the eval's own checkers).

Everything is a pure function of a seed (``random.Random``), so the demo is reproducible
offline. Benchmark prompts never occur among the training prompts: a score measures
generalisation to new instances of the skill, not recall of a training row.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from . import prompts

LETTERS = "ABCD"


@dataclass(frozen=True)
class Difficulty:
    """The knobs that keep scores informative (neither all 0 nor all 1) for a tiny model."""

    math_steps: tuple[int, ...] = (2, 3, 4)
    math_max_operand: int = 9
    math_max_value: int = 9
    code_steps: tuple[int, ...] = (1, 2)
    science_facts: int = 3
    #: how the science teacher gets from the answer to its letter: "listing" rewrites the
    #: choices as "text letter" pairs; "checks" checks the choices in order (easier for a
    #: 1M-parameter model: no look-up of the letter written before a word)
    science_reasoning: Literal["listing", "checks"] = "listing"
    #: copies of each single-digit fact in the general pre-training text
    math_fact_repeats: int = 1


@dataclass
class Domain:
    """One domain's data, ready to write to JSONL."""

    name: str
    kind: str  # the eval stage's benchmark kind: math | code | multiple_choice
    train: list[dict[str, Any]] = field(default_factory=list)  # {"messages": [...]}
    bench: list[dict[str, Any]] = field(default_factory=list)  # benchmark rows
    corpus: list[str] = field(default_factory=list)  # general pre-training text
    #: a few worked chats for the student's pre-training (its own problems, disjoint from the
    #: branch data and the benchmark): like R1-Distill-Qwen, the student already reasons a
    #: little; the branch then makes it a specialist
    warmup: list[dict[str, Any]] = field(default_factory=list)
    #: each training chat's problem as a benchmark row (multiple choice: in the order shown),
    #: so tests can grade the teacher with the eval stage's own checkers
    train_rows: list[dict[str, Any]] = field(default_factory=list)
    #: the teacher's response to each benchmark row (multiple choice: choices as listed)
    bench_solutions: list[str] = field(default_factory=list)


def _chat(user: str, assistant: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _split(
    rng: random.Random,
    make: Callable[[random.Random], tuple[str, Any]],
    counts: tuple[int, ...],
    max_tries: int = 200_000,
) -> list[list[Any]]:
    """Draw distinct problems (by prompt text) and deal them out in ``counts`` (benchmark,
    branch data, warm-up): no prompt occurs in two of them."""
    seen: set[str] = set()
    items: list[Any] = []
    tries = 0
    while len(items) < sum(counts) and tries < max_tries:
        tries += 1
        key, item = make(rng)
        if key in seen:
            continue
        seen.add(key)
        items.append(item)
    if len(items) < sum(counts):
        raise ValueError(f"only {len(items)} distinct problems; lower the counts or raise the difficulty")
    out, start = [], 0
    for n in counts:
        out.append(items[start : start + n])
        start += n
    return out


# --------------------------------------------------------------------------- math

_OPS: dict[str, Callable[[int, int], int]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
}


@dataclass(frozen=True)
class ArithmeticProblem:
    """Arithmetic evaluated from left to right, e.g. ``7 - 6 + 3 * 1`` (= 4)."""

    first: int
    steps: tuple[tuple[str, int], ...]

    def expression(self, start: int = 0, value: int | None = None) -> str:
        """The expression from step ``start`` on, with ``value`` in place of what came before."""
        text = str(self.first if value is None else value)
        for op, n in self.steps[start:]:
            text = f"{text} {op} {n}"
        return text

    def trace(self) -> list[tuple[int, str, int, int]]:
        """(left, op, right, result) for every step: the worked solution."""
        out = []
        value = self.first
        for op, n in self.steps:
            new = _OPS[op](value, n)
            out.append((value, op, n, new))
            value = new
        return out

    @property
    def answer(self) -> int:
        return self.trace()[-1][3]


def _draw_arithmetic(rng: random.Random, d: Difficulty) -> ArithmeticProblem:
    while True:
        value = rng.randint(1, d.math_max_operand)
        first = value
        steps: list[tuple[str, int]] = []
        for _ in range(rng.choice(d.math_steps)):
            op = rng.choice("+-*")
            n = rng.randint(2 if op == "*" else 1, d.math_max_operand)
            new = _OPS[op](value, n)
            if not 0 <= new <= d.math_max_value:
                break
            steps.append((op, n))
            value = new
        else:
            return ArithmeticProblem(first, tuple(steps))


def math_domain(rng: random.Random, n_train: int, n_bench: int, n_warmup: int, d: Difficulty) -> Domain:
    def make(r: random.Random) -> tuple[str, ArithmeticProblem]:
        p = _draw_arithmetic(r, d)
        return p.expression(), p

    bench, train, warmup = _split(rng, make, (n_bench, n_train, n_warmup))
    dom = Domain("math", "math")
    for p in train:
        dom.train.append(_chat(prompts.math_prompt(math_problem_text(p)), math_solution(p)))
        dom.train_rows.append({"problem": math_problem_text(p), "answer": str(p.answer)})
    dom.bench = [{"problem": math_problem_text(p), "answer": str(p.answer)} for p in bench]
    dom.bench_solutions = [math_solution(p) for p in bench]
    # General text: single arithmetic facts (what a pre-trained model "knows"), never the
    # multi-step problems themselves.
    for a in range(0, d.math_max_value + 1):
        for b in range(1, d.math_max_operand + 1):
            for op in "+-*":
                c = _OPS[op](a, b)
                if 0 <= c <= d.math_max_value:
                    dom.corpus.extend([f"{a} {op} {b} = {c}"] * d.math_fact_repeats)
    dom.warmup = [_chat(prompts.math_prompt(math_problem_text(p)), math_solution(p)) for p in warmup]
    return dom


def math_problem_text(p: ArithmeticProblem) -> str:
    return f"Compute from left to right: {p.expression()}."


def math_solution(p: ArithmeticProblem) -> str:
    """The teacher: do the first operation, rewrite what is left, repeat (a scratchpad whose
    every step is a copy plus one single-digit fact), then box the answer."""
    parts = []
    for i, (a, op, b, c) in enumerate(p.trace()):
        rest = p.expression(i + 1, c)
        parts.append(f"{a} {op} {b} = {c}, so {rest}." if i + 1 < len(p.steps) else f"{a} {op} {b} = {c}.")
    work = " ".join(parts)
    return f"<think>{work}</think>\nThe answer is \\boxed{{{p.answer}}}."


# --------------------------------------------------------------------------- code


@dataclass(frozen=True)
class CodeOp:
    """One transformation: its wording in a question, its line of Python, and its meaning."""

    phrase: str
    line: str
    fn: Callable[[Any], Any]


def _prefix(k: int) -> Callable[[str], str]:
    return lambda s: s[:k]


def _replace(a: str, b: str) -> Callable[[str], str]:
    return lambda s: s.replace(a, b)


def _string_op(rng: random.Random) -> CodeOp:
    c1, c2 = rng.sample(string.ascii_lowercase[:8], 2)
    k = rng.randint(2, 4)
    choices = [
        CodeOp("reverse it", "s = s[::-1]", lambda s: s[::-1]),
        CodeOp("make it upper case", "s = s.upper()", str.upper),
        CodeOp("make it lower case", "s = s.lower()", str.lower),
        CodeOp("repeat it twice", "s = s + s", lambda s: s + s),
        CodeOp("drop its first character", "s = s[1:]", lambda s: s[1:]),
        CodeOp("drop its last character", "s = s[:-1]", lambda s: s[:-1]),
        CodeOp(f"keep its first {k} characters", f"s = s[:{k}]", _prefix(k)),
        CodeOp("sort its characters", 's = "".join(sorted(s))', lambda s: "".join(sorted(s))),
        CodeOp(f"replace every {c1} with {c2}", f's = s.replace("{c1}", "{c2}")', _replace(c1, c2)),
    ]
    return rng.choice(choices)


def _arith(op: str, k: int) -> Callable[[int], int]:
    table: dict[str, Callable[[int], int]] = {
        "+": lambda n: n + k,
        "-": lambda n: n - k,
        "*": lambda n: n * k,
        "%": lambda n: n % k,
        "//": lambda n: n // k,
    }
    return table[op]


def _int_op(rng: random.Random) -> CodeOp:
    k = rng.randint(2, 9)
    phrase, op = rng.choice(
        [
            (f"add {k}", "+"),
            (f"subtract {k}", "-"),
            (f"multiply it by {k}", "*"),
            (f"take the remainder modulo {k}", "%"),
            (f"divide it by {k} rounding down", "//"),
        ]
    )
    return CodeOp(phrase, f"n = n {op} {k}", _arith(op, k))


@dataclass(frozen=True)
class CodeProblem:
    """Read one line (a word or an integer), apply the steps, print the result."""

    typ: str  # "str" | "int"
    ops: tuple[CodeOp, ...]
    inputs: tuple[str, ...]

    def question(self) -> str:
        what = "a word s" if self.typ == "str" else "an integer n"
        steps = ", then ".join(op.phrase for op in self.ops)
        return f"Read {what}, {steps}, and print it."

    def program(self) -> str:
        first = "s = input()" if self.typ == "str" else "n = int(input())"
        var = "s" if self.typ == "str" else "n"
        return "\n".join([first, *(op.line for op in self.ops), f"print({var})"])

    def run(self, raw: str) -> str:
        value: Any = raw if self.typ == "str" else int(raw)
        for op in self.ops:
            value = op.fn(value)
        return str(value)

    def tests(self) -> list[dict[str, str]]:
        return [{"input": i + "\n", "output": self.run(i) + "\n"} for i in self.inputs]


def _draw_code(rng: random.Random, d: Difficulty) -> CodeProblem:
    typ = rng.choice(["str", "int"])
    steps = rng.choice(d.code_steps)
    if typ == "str":
        ops = tuple(_string_op(rng) for _ in range(steps))
        letters = string.ascii_lowercase[:8] + string.ascii_uppercase[:4]
        inputs = tuple("".join(rng.choice(letters) for _ in range(rng.randint(4, 7))) for _ in range(3))
    else:
        ops = tuple(_int_op(rng) for _ in range(steps))
        inputs = tuple(str(rng.randint(0, 99)) for _ in range(3))
    return CodeProblem(typ, ops, inputs)


def code_solution(p: CodeProblem) -> str:
    """The teacher: each step and its line of Python, then the whole program."""
    plan = " ".join(f"{op.phrase.capitalize()}: {op.line}." for op in p.ops)
    return f"<think>{plan}</think>\n```python\n{p.program()}\n```"


def code_domain(rng: random.Random, n_train: int, n_bench: int, n_warmup: int, d: Difficulty) -> Domain:
    def make(r: random.Random) -> tuple[str, CodeProblem]:
        p = _draw_code(r, d)
        return p.question(), p

    bench, train, warmup = _split(rng, make, (n_bench, n_train, n_warmup))
    dom = Domain("code", "code")
    for p in train:
        dom.train.append(_chat(prompts.code_prompt(p.question()), code_solution(p)))
        dom.train_rows.append({"question": p.question(), "tests": p.tests()})
    dom.bench = [{"question": p.question(), "tests": p.tests()} for p in bench]
    dom.bench_solutions = [code_solution(p) for p in bench]
    for p in train:
        if rng.random() < 0.5:
            dom.corpus.append(p.program())
    dom.warmup = [_chat(prompts.code_prompt(p.question()), code_solution(p)) for p in warmup]
    return dom


# --------------------------------------------------------------------------- science

HABITATS = ["desert", "marsh", "reef", "cave", "forest", "tundra", "lake", "meadow"]
DIETS = ["seeds", "fish", "insects", "leaves", "moss", "fruit", "roots", "algae"]
_SYLLABLES = ["bo", "ka", "zu", "mi", "tel", "ron", "vi", "pa", "gor", "shi", "den", "lu", "fa", "nix", "qua"]


@dataclass(frozen=True)
class World:
    """A generated fact base: every creature is of a kind; every kind has a habitat and a diet."""

    kinds: dict[str, tuple[str, str]]  # kind -> (habitat, diet)
    creatures: dict[str, str]  # creature -> kind

    def sentences(self) -> list[str]:
        out = [f"Every {k} lives in the {h} and eats {d}." for k, (h, d) in self.kinds.items()]
        out += [f"The {c} is a kind of {k}." for c, k in self.creatures.items()]
        return out


def make_world(rng: random.Random, n_kinds: int = 24, n_creatures: int = 120) -> World:
    names: set[str] = set()

    def name(parts: int) -> str:
        while True:
            n = "".join(rng.choice(_SYLLABLES) for _ in range(parts))
            if n not in names:
                names.add(n)
                return n

    kinds = {name(2): (rng.choice(HABITATS), rng.choice(DIETS)) for _ in range(n_kinds)}
    kind_names = sorted(kinds)
    creatures = {name(3): rng.choice(kind_names) for _ in range(n_creatures)}
    return World(kinds, creatures)


@dataclass(frozen=True)
class ScienceProblem:
    """Two-hop question: creature -> kind -> property, with the facts (and distractors) given."""

    creature: str
    kind: str
    attribute: str  # "habitat" | "diet"
    answer: str
    choices: tuple[str, ...]
    facts: tuple[str, ...]

    def question(self) -> str:
        ask = f"Where does the {self.creature} live?" if self.attribute == "habitat" else (
            f"What does the {self.creature} eat?"
        )
        return " ".join(self.facts) + " " + ask


def _draw_science(rng: random.Random, world: World, d: Difficulty) -> ScienceProblem:
    creature = rng.choice(sorted(world.creatures))
    kind = world.creatures[creature]
    habitat, diet = world.kinds[kind]
    attribute = rng.choice(["habitat", "diet"])
    answer = habitat if attribute == "habitat" else diet
    pool = HABITATS if attribute == "habitat" else DIETS
    choices = (answer, *rng.sample([x for x in pool if x != answer], 3))
    facts = [f"The {creature} is a kind of {kind}.", f"Every {kind} lives in the {habitat} and eats {diet}."]
    others = [k for k in world.kinds if k != kind]
    while len(facts) < d.science_facts:
        other = rng.choice(others)
        h, di = world.kinds[other]
        members = [f"The {c} is a kind of {other}." for c, k in world.creatures.items() if k == other]
        fact = rng.choice([f"Every {other} lives in the {h} and eats {di}.", *members[:1]])
        if fact not in facts:
            facts.append(fact)
    rng.shuffle(facts)
    return ScienceProblem(creature, kind, attribute, answer, choices, tuple(facts))


def science_solution(p: ScienceProblem, shown: list[str], style: str = "listing") -> str:
    """The teacher: follow the two facts, then get from the answer to its letter as shown
    (see ``Difficulty.science_reasoning``), then name the letter."""
    letter = LETTERS[shown.index(p.answer)]
    verb = "lives in the" if p.attribute == "habitat" else "eats"
    facts = f"The {p.creature} is a kind of {p.kind}. Every {p.kind} {verb} {p.answer}."
    if style == "checks":
        # Each check is a copy of a choice line and a same-word test.
        checks = []
        for i, choice in enumerate(shown):
            checks.append(f"{LETTERS[i]}) {choice} {'yes' if choice == p.answer else 'no'}.")
            if choice == p.answer:
                break
        thought = f"{facts} {' '.join(checks)}"
    else:
        # "text letter" pairs, then the answer again: its letter is the token that followed
        # it last time (what a small transformer's induction heads do).
        listing = ", ".join(f"{c} {LETTERS[i]}" for i, c in enumerate(shown))
        thought = f"{facts} {listing}. So {p.answer} {letter}."
    return f"<think>{thought}</think>\nThe answer is {letter}."


def science_domain(rng: random.Random, n_train: int, n_bench: int, n_warmup: int, d: Difficulty) -> Domain:
    world = make_world(rng)

    def make(r: random.Random) -> tuple[str, ScienceProblem]:
        p = _draw_science(r, world, d)
        return p.question(), p

    bench, train, warmup = _split(rng, make, (n_bench, n_train, n_warmup))
    dom = Domain("science", "multiple_choice")
    for p in train:
        # The eval shuffles choices per sample; so does the teacher's data.
        order = list(p.choices)
        rng.shuffle(order)
        dom.train.append(_chat(prompts.mc_prompt(p.question(), order), science_solution(p, order, d.science_reasoning)))
        dom.train_rows.append({"question": p.question(), "choices": order, "answer": p.answer})
    dom.bench = [{"question": p.question(), "choices": list(p.choices), "answer": p.answer} for p in bench]
    dom.bench_solutions = [science_solution(p, list(p.choices), d.science_reasoning) for p in bench]
    for p in warmup:
        order = list(p.choices)
        rng.shuffle(order)
        dom.warmup.append(_chat(prompts.mc_prompt(p.question(), order), science_solution(p, order, d.science_reasoning)))
    dom.corpus = world.sentences()
    return dom


# --------------------------------------------------------------------------- all


def make_domains(
    seed: int = 0,
    n_train: int = 800,
    n_bench: int = 40,
    difficulty: Difficulty | None = None,
    n_warmup: int | None = None,
) -> list[Domain]:
    """The three domains, each from its own seeded stream (changing one leaves the others).
    ``n_warmup`` worked chats per domain go into the student's pre-training (default 10% of
    ``n_train``)."""
    d = difficulty or Difficulty()
    w = max(1, n_train // 10) if n_warmup is None else n_warmup
    return [
        math_domain(random.Random(f"{seed}-math"), n_train, n_bench, w, d),
        code_domain(random.Random(f"{seed}-code"), n_train, n_bench, w, d),
        science_domain(random.Random(f"{seed}-science"), n_train, n_bench, w, d),
    ]
