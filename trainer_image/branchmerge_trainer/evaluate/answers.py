"""Reading answers out of model responses, and deciding whether they are right.

Pure functions (no I/O, no model): which part of a response counts as the answer (after
``</think>``), the last ``\\boxed{}`` expression, the chosen letter of a multiple-choice
question, the final fenced program, and output comparison for code tests. Math equivalence
goes through math-verify because string equality scores ``0.5`` vs ``\\frac{1}{2}`` or
``(1,2]`` vs ``(1, 2]`` as wrong, which under-reports a model by several points on AIME.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def answer_region(response: str, *, thinking_open: bool = False) -> str:
    """The part of a response that may hold the final answer.

    Reasoning models write ``<think> … </think>`` first; anything inside is scratch work and
    must not be scored (a model that guesses five answers while thinking is not right five
    times). ``thinking_open`` says the prompt itself ended inside a think block (R1-style chat
    templates append ``<think>``), so a response without ``</think>`` never finished thinking.
    """
    if THINK_CLOSE in response:
        return response.rsplit(THINK_CLOSE, 1)[1]
    if thinking_open or THINK_OPEN in response:
        return ""
    return response


# --------------------------------------------------------------------------- math

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (or ``\\fbox{…}``) with balanced braces, else None."""
    found: str | None = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            if text[i] == "\\" and i + 1 < len(text):
                i += 2  # an escaped brace such as \{ does not nest
                continue
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end() : i - 1].strip()
    return found


def extract_math_answer(response: str, *, thinking_open: bool = False) -> str | None:
    """The final answer of a math response: the last boxed expression after ``</think>``."""
    boxed = last_boxed(answer_region(response, thinking_open=thinking_open))
    return boxed if boxed else None


def parse_gold(answer: str) -> list[Any]:
    """Parse a reference answer once (math-verify objects) so each sample only parses its own."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    text = answer.strip()
    if not text.startswith("$") and "\\boxed" not in text:
        text = f"${text}$"
    return list(parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()]))


def math_equal(gold: str | list[Any], predicted: str | None) -> bool:
    """Whether ``predicted`` (a boxed expression's content) equals the reference answer.

    Numbers, fractions, radicals, LaTeX, sets and intervals are compared symbolically by
    math-verify; a plain string match is tried first because it is exact and cheap.
    """
    if predicted is None or not predicted.strip():
        return False
    if isinstance(gold, str):
        if _norm_ws(gold) == _norm_ws(predicted):
            return True
        gold = parse_gold(gold)
    if not gold:
        return False
    from math_verify import LatexExtractionConfig, parse, verify

    pred = parse(f"\\boxed{{{predicted}}}", extraction_config=[LatexExtractionConfig(boxed_match_priority=0)])
    if not pred:
        return False
    return bool(verify(gold, pred))


def _norm_ws(s: str) -> str:
    return re.sub(r"\s+", "", s.strip().strip("$"))


# --------------------------------------------------------------------------- multiple choice


def choice_letters(n: int) -> str:
    """``ABCD…`` for ``n`` choices (at most 26)."""
    if not 1 <= n <= 26:
        raise ValueError(f"a multiple-choice question needs 1–26 choices, got {n}")
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n]


def _letter_patterns(letters: str) -> list[re.Pattern[str]]:
    """Phrasings of a chosen letter, strongest first. Only capital letters count: a lowercase
    ``a`` is far more often the article ("the answer is a prime") than a choice."""
    L = f"[{letters}]"
    end = r"(?![A-Za-z0-9])"
    return [
        # \boxed{C}, \boxed{(C)}, \boxed{\text{C}}
        re.compile(rf"\\boxed\s*\{{\s*(?:\\text(?:bf)?\s*\{{)?\s*\(?\s*({L})\s*\)?\s*\}}?\s*\}}"),
        # Answer: C / The answer is (C) / **Answer:** C / final answer is option C / Answer: $C$
        re.compile(
            rf"(?i:answer)(?:\s+(?i:is))?\s*[:：]?\s*[*_$]*\s*(?:(?i:option|choice)\s*)?[(\[]?\s*({L})\s*[)\]]?[*_$]*{end}"
        ),
        # I choose C / I'd go with (B) / select option D
        re.compile(rf"(?i:choose|select|pick|go with)\s+(?:(?i:option|choice)\s+)?\(?({L})\)?{end}"),
        # option C / choice (C)
        re.compile(rf"(?i:option|choice)\s*\(?({L}){end}"),
        # (C)
        re.compile(rf"\(({L})\)"),
        # a line that is only the letter: "C", "**C**", "C.", "(C)" — not "C) 42", which is
        # how models restate the options
        re.compile(rf"(?m)^\s*[*_]*\(?({L})\)?[*_]*\s*\.?\s*$"),
    ]


def extract_choice(response: str, n_choices: int, *, thinking_open: bool = False) -> str | None:
    """The letter a response chose among ``n_choices`` (``A``…), or None.

    The strongest phrasing wins; among matches of one phrasing, the last one (models often
    restate the question's options before concluding).
    """
    text = answer_region(response, thinking_open=thinking_open)
    if not text.strip():
        return None
    for pattern in _letter_patterns(choice_letters(n_choices)):
        matches = pattern.findall(text)
        if matches:
            return str(matches[-1])
    return None


# --------------------------------------------------------------------------- code

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.S)


def extract_program(response: str, *, thinking_open: bool = False) -> str | None:
    """The last fenced code block after ``</think>`` (Python or unlabelled), else None."""
    text = answer_region(response, thinking_open=thinking_open)
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    for lang, body in reversed(blocks):
        if lang in {"", "python", "py", "python3"} and body.strip():
            return body
    return None


def outputs_match(expected: str, actual: str, *, rel_tol: float = 1e-6) -> bool:
    """Compare a program's stdout with the expected output the way judges do.

    Trailing whitespace and trailing blank lines do not matter; otherwise tokens must match,
    with numbers equal within ``rel_tol`` (so ``0.5`` and ``0.500000`` both pass).
    """
    exp = [line.rstrip() for line in expected.rstrip().splitlines()]
    act = [line.rstrip() for line in actual.rstrip().splitlines()]
    if exp == act:
        return True
    exp_tokens, act_tokens = " ".join(exp).split(), " ".join(act).split()
    if len(exp_tokens) != len(act_tokens) or len(exp) != len(act):
        return False
    return all(_token_equal(e, a, rel_tol) for e, a in zip(exp_tokens, act_tokens, strict=True))


def _token_equal(e: str, a: str, rel_tol: float) -> bool:
    if e == a:
        return True
    try:
        fe, fa = float(e), float(a)
    except ValueError:
        return False
    return math.isclose(fe, fa, rel_tol=rel_tol, abs_tol=rel_tol)


def json_outputs_match(expected: str, actual: str) -> bool:
    """Compare a function's printed JSON result with the expected JSON value."""
    try:
        return bool(json.loads(expected) == json.loads(actual))
    except (ValueError, TypeError):
        return outputs_match(expected, actual)
