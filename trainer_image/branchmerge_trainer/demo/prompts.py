"""The user turns of the demo's trajectories, rendered by the eval stage's own code.

A tiny model does not generalise across wordings, so the teacher's prompts must be exactly
the prompts the eval stage will send. The demo's manifest pins these templates per benchmark
and the trajectories are rendered through the same ``Task.user_message`` the eval uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..evaluate.benchmarks import CodeTask, MathTask, MultipleChoiceTask, Problem

#: Short templates: every prompt token costs a tiny model's context and the CPU's time.
MATH_TEMPLATE = "{problem}\nPut the final answer in \\boxed{}."
CODE_TEMPLATE = "{question}\nWrite a Python program that reads stdin and prints the answer."
MC_TEMPLATE = "{question}\n{choices}"


def math_prompt(problem: str) -> str:
    return MathTask().user_message(MATH_TEMPLATE, Problem("0", {"problem": problem, "answer": ""}), {})


def code_prompt(question: str) -> str:
    fields: dict[str, Any] = {"question": question, "tests": [], "entry_point": None, "starter_code": ""}
    return CodeTask().user_message(CODE_TEMPLATE, Problem("0", fields), {})


def mc_prompt(question: str, choices: Sequence[str]) -> str:
    """``choices`` in the order shown (the eval shuffles per sample; so does the teacher)."""
    fields = {"question": question, "choices": list(choices), "answer_index": 0}
    return MultipleChoiceTask().user_message(MC_TEMPLATE, Problem("0", fields), {"order": list(range(len(choices)))})
