"""Reading answers out of responses and judging them (hand-written cases)."""

from __future__ import annotations

import pytest

from branchmerge_trainer.evaluate.answers import (
    answer_region,
    extract_choice,
    extract_math_answer,
    extract_program,
    json_outputs_match,
    last_boxed,
    math_equal,
    outputs_match,
)

# --------------------------------------------------------------------------- math


@pytest.mark.parametrize(
    ("gold", "predicted"),
    [
        ("204", "204"),
        ("\\frac{1}{2}", "0.5"),
        ("\\frac{1}{2}", "\\dfrac12"),
        ("0.5", "\\frac{1}{2}"),
        ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
        ("(1,2]", "(1, 2]"),
        ("\\{1,2\\}", "\\{2, 1\\}"),
        ("x^2+1", "1+x^2"),
        ("204", "204^\\circ"),
        ("33", "033"),
        ("\\frac{3}{4}", "\\frac{6}{8}"),
    ],
)
def test_equivalent_math_answers_are_correct(gold: str, predicted: str) -> None:
    assert math_equal(gold, predicted)


@pytest.mark.parametrize(
    ("gold", "predicted"),
    [
        ("204", "205"),
        ("\\frac{1}{2}", "0.51"),
        ("(1,2]", "[1,2]"),
        ("\\{1,2\\}", "\\{1,3\\}"),
        ("x^2+1", "x^2-1"),
        ("10", ""),
        ("10", None),
    ],
)
def test_different_math_answers_are_wrong(gold: str, predicted: str | None) -> None:
    assert not math_equal(gold, predicted)


def test_math_answer_is_the_last_boxed_after_think() -> None:
    response = "<think>maybe \\boxed{5}?</think>First \\boxed{6}, finally \\boxed{\\frac{1}{2}}."
    assert extract_math_answer(response) == "\\frac{1}{2}"


def test_boxed_inside_think_only_is_no_answer() -> None:
    assert extract_math_answer("<think>the answer is \\boxed{7}</think>I am not sure.") is None
    assert extract_math_answer("<think>the answer is \\boxed{7} but let me check") is None  # never closed


def test_missing_boxed_is_no_answer() -> None:
    assert extract_math_answer("The answer is 7.") is None
    assert extract_math_answer("\\boxed{}") is None


def test_open_think_from_the_prompt() -> None:
    """R1 templates put <think> in the prompt: a response without </think> is unfinished."""
    assert extract_math_answer("so \\boxed{3}", thinking_open=True) is None
    assert extract_math_answer("so...</think> \\boxed{3}", thinking_open=True) == "3"
    assert extract_math_answer("so \\boxed{3}") == "3"  # no reasoning format at all


def test_boxed_with_nested_and_escaped_braces() -> None:
    assert last_boxed("\\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("\\fbox{4}") == "4"


def test_answer_region() -> None:
    assert answer_region("<think>a</think>b") == "b"
    assert answer_region("<think>a") == ""
    assert answer_region("plain") == "plain"


# --------------------------------------------------------------------------- letters


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("Answer: C", "C"),
        ("The answer is (B).", "B"),
        ("**Answer:** D", "D"),
        ("**Answer: A**", "A"),
        ("the correct answer is: **B**", "B"),
        ("Final Answer: $C$", "C"),
        ("ANSWER: D", "D"),
        ("\\boxed{B}", "B"),
        ("So the answer is \\boxed{(C)}", "C"),
        ("\\boxed{\\text{A}}", "A"),
        ("I choose B.", "B"),
        ("I'd go with (D)", "D"),
        ("Option C is correct.", "C"),
        ("Therefore (A) is right.", "A"),
        ("Lots of thought.\nB", "B"),
        ("**C**", "C"),
        ("The answer is C) 42", "C"),
        ("A) 1\nB) 2\nC) 3\nD) 4\nAnswer: B", "B"),  # restated options, then the answer
        ("<think>Answer: A</think>Answer: D", "D"),
        ("Answer: B\n...wait, on reflection, Answer: C", "C"),  # last statement wins
    ],
)
def test_letter_phrasings(response: str, letter: str) -> None:
    assert extract_choice(response, 4) == letter


@pytest.mark.parametrize(
    "response",
    [
        "the answer is a prime number",  # lowercase 'a' is an article, not a choice
        "Answer: E",  # out of range for 4 choices
        "<think>Answer: A</think>",  # nothing after thinking
        "<think>Answer: A",  # never stopped thinking
        "I do not know.",
        "A) 1\nB) 2",  # only restated options
        "",
    ],
)
def test_no_letter(response: str) -> None:
    assert extract_choice(response, 4) is None


def test_more_choices_allow_more_letters() -> None:
    assert extract_choice("Answer: F", 6) == "F"


# --------------------------------------------------------------------------- code


def test_program_is_the_last_python_block_after_think() -> None:
    response = (
        "<think>```python\nprint('draft')\n```</think>Here:\n```python\nprint(1)\n```\n"
        "Then the final one:\n```py\nprint(2)\n```\nExample output:\n```text\n2\n```"
    )
    assert extract_program(response) == "print(2)\n"


def test_unlabelled_block_counts_and_no_block_is_none() -> None:
    assert extract_program("```\nx = 1\n```") == "x = 1\n"
    assert extract_program("print(1)") is None
    assert extract_program("<think>```python\nprint(1)\n```") is None


def test_output_comparison() -> None:
    assert outputs_match("1 2\n3\n", "1 2   \n3\n\n")
    assert outputs_match("0.5\n", "0.5000000")
    assert not outputs_match("1 2\n3\n", "1 2 3\n")
    assert not outputs_match("YES", "NO")
    assert not outputs_match("0.5", "0.6")
    assert json_outputs_match("[1, 2]", "[1,2]\n")
    assert not json_outputs_match("[1, 2]", "[2, 1]")
    assert json_outputs_match("hello", "hello\n")  # not JSON: text comparison
