"""`branchmerge demo` / `branchmerge run` end to end with the real stages on tiny models:
the whole pipeline, reuse by fingerprint, a changed branch, a failing stage, Ctrl-C + resume.

The tests share one demo directory (fingerprints include the student's URI, so the work can
only be reused in place) and run in file order, each starting from "everything committed".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.slow

BRANCHMERGE = str(Path(sys.executable).with_name("branchmerge"))
STAGES = ["branch-math", "branch-science", "branch-code", "merge", "eval"]


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run([BRANCHMERGE, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)


def state(root: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / "state.json").read_text())
    return data


def stage_states(root: Path) -> dict[str, str]:
    return {s["name"]: s["state"] for s in state(root)["stages"]}


def variant(root: Path, name: str, change: Callable[[dict[str, Any]], None]) -> Path:
    """A copy of the demo's manifest with one change."""
    doc = yaml.safe_load((root / "distillation.yaml").read_text())
    change(doc)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def branch(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(b for b in doc["spec"]["branches"] if b["name"] == name)
    return found


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str], float]:
    root = tmp_path_factory.mktemp("demo")
    start = time.monotonic()
    out = cli("demo", "--workdir", str(root), "--profile", "tiny", "--parallel", "2")
    return root, out, time.monotonic() - start


def test_demo_runs_the_whole_pipeline(demo: tuple[Path, subprocess.CompletedProcess[str], float]) -> None:
    root, out, _ = demo
    assert out.returncode == 0, out.stdout + out.stderr
    assert stage_states(root) == dict.fromkeys(STAGES, "succeeded")
    scores = {(s["model"], s["benchmark"]) for s in state(root)["stages"][-1]["result"]["scores"]}
    assert scores == {(m, b) for m in ("merged", "student", "math", "science", "code") for b in ("math", "code", "science")}
    merged = state(root)["stages"][3]["output"].removeprefix("file://")
    assert (Path(merged) / "config.json").exists() and (Path(merged) / "_MANIFEST.json").exists()
    assert f"merged model: file://{merged}" in out.stdout.replace("\n", "")
    assert "pass@1 (%)" in out.stdout and "demo finished in" in out.stdout
    # Each stage got exactly the planner's config (what `branchmerge plan --json` prints).
    plan = json.loads(cli("plan", str(root / "distillation.yaml"), "--json").stdout)[0]["stages"]
    for planned in plan:
        sent = json.loads((root / "stages" / planned["name"] / "config.json").read_text())
        assert sent == planned


def test_rerun_reuses_every_committed_output(demo: tuple[Path, subprocess.CompletedProcess[str], float]) -> None:
    root, _, first = demo
    start = time.monotonic()
    out = cli("run", str(root / "distillation.yaml"), "--workdir", str(root))
    assert out.returncode == 0, out.stderr
    assert stage_states(root) == dict.fromkeys(STAGES, "cached")
    assert time.monotonic() - start < first / 2
    again = cli("demo", "--workdir", str(root), "--profile", "tiny")  # the demo reuses its inputs too
    assert again.returncode == 0 and stage_states(root) == dict.fromkeys(STAGES, "cached")
    status = cli("status", str(root))
    assert status.returncode == 0 and "student" in status.stdout and "merged model:" in status.stdout


def test_changed_branch_reruns_that_branch_merge_and_eval(demo: tuple[Path, Any, float]) -> None:
    root = demo[0]
    path = variant(root, "math-changed", lambda d: branch(d, "math")["datasets"][0].update(maxSamples=40))
    out = cli("run", str(path), "--workdir", str(root), "--dry-run")
    assert out.returncode == 0
    assert [line.split("│")[2].strip() for line in out.stdout.splitlines() if line.startswith("│ ")] == [
        "run", "cached", "cached", "run", "run"
    ]
    out = cli("run", str(path), "--workdir", str(root))
    assert out.returncode == 0, out.stdout + out.stderr
    assert stage_states(root) == {
        "branch-math": "succeeded",
        "branch-science": "cached",
        "branch-code": "cached",
        "merge": "succeeded",
        "eval": "succeeded",
    }


def test_failing_stage_reports_and_keeps_the_others(demo: tuple[Path, Any, float]) -> None:
    root = demo[0]
    bad = root / "data" / "science" / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"nothing": 1}\n')
    path = variant(root, "science-bad", lambda d: branch(d, "science")["datasets"][0].update(uri=f"file://{bad}"))
    out = cli("run", str(path), "--workdir", str(root))
    assert out.returncode == 1
    assert stage_states(root) == {
        "branch-math": "cached",
        "branch-science": "failed",
        "branch-code": "cached",
        "merge": "blocked",
        "eval": "blocked",
    }
    science = state(root)["stages"][1]
    assert science["reason"].startswith("InvalidInput: ") and "bad.jsonl" in science["reason"]
    text = out.stdout.replace("\n", "")
    assert "✗ branch-science failed: InvalidInput" in text and "stages/branch-science/log.txt" in text
    for s in state(root)["stages"][::2][:2]:  # math and code outputs are still committed
        assert (Path(s["output"].removeprefix("file://")) / "_MANIFEST.json").exists()


def test_ctrl_c_then_resume_from_checkpoint(demo: tuple[Path, Any, float]) -> None:
    root = demo[0]

    def longer(d: dict[str, Any]) -> None:
        # Steps of 64 rows (~0.1 s each on an idle core, longer on a busy one): slow enough
        # to be interrupted after the checkpoint at step 5, short enough to finish quickly.
        training = {"maxSteps": 60, "epochs": 1000, "checkpointInterval": 5, "globalBatchSize": 64, "microBatchSize": 16}
        branch(d, "code")["training"].update(training)

    path = variant(root, "code-long", longer)
    progress = root / "stages" / "branch-code" / "progress.jsonl"
    progress.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [BRANCHMERGE, "run", str(path), "--workdir", str(root), "--only", "code"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 300
    step = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.exists():
            lines = progress.read_text().splitlines()
            step = json.loads(lines[-1].split(" ", 1)[1])["step"] if lines else 0
            if step >= 10:
                break
        time.sleep(0.2)
    assert step >= 10, proc.communicate()[0] if proc.poll() is not None else "no progress"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    code = state(root)["stages"][2]
    assert code["state"] == "interrupted" and code["result"]["error"]["reason"] == "Interrupted"
    assert "run the same command again to resume" in out

    again = cli("run", str(path), "--workdir", str(root), "--only", "code")
    assert again.returncode == 0, again.stdout + again.stderr
    metrics = state(root)["stages"][2]["result"]["metrics"]
    assert metrics["resumed_from_step"] >= 5 and metrics["steps"] == 60
