"""Regression check for the CPU-scale Table 2 reproduction (``bench/reproduce_table2.py --small``).

It asserts only what held in every (SFT seed × eval seed) run of the full study with the same
settings (docs/reproduction.md): the math and science specialists beat the student on their own
domain. Not asserted, because it did not hold robustly: the code specialist beating the student
(0 of 24 solved in one of four runs) and the merged model beating the student (it solved none).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

#: 65–125 CPU-seconds in all (student pre-training, 3 SFTs, a merge, an eval): measured 2 min
#: at load ~5 and 11 min at load ~14 on 2 shared cores.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]
DOMAINS = ("math", "code", "science")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the small study once into a temporary directory; its results JSON."""
    tmp = tmp_path_factory.mktemp("reproduction")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "reproduce_table2.py"),
            "--small",
            "--workdir",
            str(tmp / "work"),
            "--out",
            str(tmp / "out"),
            "--manifests",
            str(tmp / "manifests"),
        ],
        capture_output=True,
        text=True,
        timeout=2300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data: dict[str, Any] = json.loads((tmp / "out" / "small.json").read_text())
    return data


def score(report: dict[str, Any], row: str, domain: str) -> float:
    value: float = report["summary"][row][domain]["mean"]
    return value


def test_every_row_is_scored_on_every_domain_with_its_compute(report: dict[str, Any]) -> None:
    rows = {
        "student",
        "math specialist",
        "code specialist",
        "science specialist",
        "merge (math & science) & code",
    }
    assert set(report["summary"]) == rows
    for row in rows:
        assert set(DOMAINS) <= set(report["summary"][row])
        if row != "student":
            assert report["summary"][row]["compute"]["train_cpu_seconds"] > 0
    merged = report["summary"]["merge (math & science) & code"]["compute"]
    assert merged["merge_cpu_seconds"] > 0
    assert report["meta"]["inputs"]["pretrain_cpu_seconds"] > 0


@pytest.mark.parametrize("domain", ["math", "science"])
def test_the_math_and_science_specialists_beat_the_student_on_their_domain(
    report: dict[str, Any], domain: str
) -> None:
    assert score(report, f"{domain} specialist", domain) > score(report, "student", domain)
