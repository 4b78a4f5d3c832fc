"""The local executor end to end on fake stages (fast): caching, a changed branch, a failing
stage, Ctrl-C and resume, parallel branches, the state file and `branchmerge status`.

The fake trainer is this file run as a script: it goes through the real stage runtime
(`runtime.execute`: committed-output check, result file, Ctrl-C → 'Interrupted') but its
"training" is a counter that sleeps, checkpoints and publishes a placeholder model. It
appends one line per invocation to $FAKE_TRAINER_LOG, so the tests can count what ran.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]


# =========================================================================== fake trainer


def _fake_run(stage: Any, ctx: Any) -> Any:
    from branchmerge_trainer.runtime import StageInputError
    from branchmerge_trainer.stages import EvalStage, MergeStage, Progress, Score, SFTStage, StageResult
    from branchmerge_trainer.storage import storage_for

    with open(os.environ["FAKE_TRAINER_LOG"], "a") as f:
        f.write(f"{stage.name} {stage.fingerprint}\n")
    step_seconds = float(os.environ.get("FAKE_STEP_SECONDS", "0.01"))
    out = ctx.workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text("{}")
    metrics: dict[str, float] = {}
    scores: list[Score] = []
    if isinstance(stage, SFTStage):
        data = storage_for(stage.datasets[0].uri).read_bytes(stage.datasets[0].uri).decode()
        if "FAIL" in data:
            raise StageInputError(f"{stage.datasets[0].uri} line 1: field 'messages' is missing")
        ckpt = storage_for(stage.checkpoints, stage.storage)
        marker = stage.checkpoints.rstrip("/") + "/step.txt"
        start = int(ckpt.read_bytes(marker)) if ckpt.exists(marker) else 0
        total = stage.training.max_steps or 5
        for step in range(start + 1, total + 1):
            time.sleep(step_seconds)
            ctx.storage.write_bytes(marker, str(step).encode())
            ctx.reporter.report(Progress(step=step, total_steps=total, loss=1.0 / step), force=True)
        metrics = {"steps": float(total), "resumed_from_step": float(start)}
    elif isinstance(stage, MergeStage):
        for name, ref in stage.models.items():
            if name != "student" and storage_for(ref.uri, stage.storage).committed(ref.uri) is None:
                raise StageInputError(f"merge input {name} is not committed")
    elif isinstance(stage, EvalStage):
        for i, name in enumerate(stage.models):
            for j, b in enumerate(stage.benchmarks):
                scores.append(Score(model=name, benchmark=b.name, score=((i + 1) * (j + 2)) % 7 / 10, samples=4))
    ctx.storage.publish_dir(
        out, stage.output, fingerprint=stage.fingerprint, stage=stage.name, metrics=metrics,
        extra={"scores": [s.dump() for s in scores]},
    )
    return StageResult(
        kind=stage.kind, status="Succeeded", fingerprint=stage.fingerprint, output=stage.output,
        metrics=metrics, scores=scores,
    )


def _fake_main() -> int:
    import argparse

    from branchmerge_trainer.runtime import execute, load_config

    p = argparse.ArgumentParser()
    p.add_argument("command")
    p.add_argument("--config", required=True)
    p.add_argument("--result-path")
    args = p.parse_args()
    code = execute(load_config(args.config), _fake_run, result_path=args.result_path)
    if os.environ.get("FAKE_CORRUPT_RESULT") and args.result_path:
        Path(args.result_path).write_text('{"apiVersion": "branchmerge.io/v1alpha1", "kind": "Ev')
    return code


if __name__ == "__main__":
    sys.exit(_fake_main())


# =========================================================================== fixtures

from rich.console import Console  # noqa: E402

from branchmerge_operator.local import Machine, load_record  # noqa: E402
from branchmerge_operator.local_cli import run_local  # noqa: E402

FAKE = [sys.executable, str(HERE)]
#: The console script (``python -m branchmerge_operator.cli`` would register the plugin
#: subcommands on a second copy of the module).
BRANCHMERGE = str(Path(sys.executable).with_name("branchmerge"))
CPU = Machine(cpus=2)


def manifest(root: Path, *, code_data: str = "code.jsonl", steps: int = 5, output: dict[str, Any] | None = None) -> Path:
    """A three-branch Distillation over file:// inputs under ``root``."""
    (root / "student").mkdir(parents=True, exist_ok=True)
    (root / "student" / "config.json").write_text("{}")
    for name in ("math", "science", "code", "code-v2", "bad"):
        (root / f"{name}.jsonl").write_text("FAIL\n" if name == "bad" else f'{{"messages": "{name}"}}\n')
    (root / "bench.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    training = {"maxSteps": steps, "globalBatchSize": 1, "zeroStage": 0, "checkpointInterval": 1}
    branch = lambda n, data: {  # noqa: E731
        "name": n,
        "datasets": [{"uri": f"file://{root}/{data}"}],
        "training": training,
        "resources": {"gpusPerNode": 0},
    }
    doc = {
        "apiVersion": "branchmerge.io/v1alpha1",
        "kind": "Distillation",
        "metadata": {"name": "fake"},
        "spec": {
            "student": {"uri": f"file://{root}/student"},
            "teacher": {"name": "procedural"},
            "output": output or {"uri": f"file://{root}/out"},
            "branches": [branch("math", "math.jsonl"), branch("science", "science.jsonl"), branch("code", code_data)],
            "merge": {"steps": [{"base": "science", "other": "math"}, {"base": "code", "other": "previous"}]},
            "eval": {
                "models": ["merged", "student", "branches"],
                "benchmarks": [{"name": "m", "kind": "math", "uri": f"file://{root}/bench.jsonl"}],
            },
        },
    }
    path = root / "dist.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "invocations.log"
    log.write_text("")
    monkeypatch.setenv("FAKE_TRAINER_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "operator"), str(ROOT / "trainer_image")]))
    return tmp_path


def invocations(root: Path) -> list[str]:
    return [line.split()[0] for line in (root / "invocations.log").read_text().splitlines()]


def run(path: Path, workdir: Path, **kw: Any) -> tuple[int, str]:
    console = Console(record=True, width=200, force_terminal=False)
    code = run_local(str(path), workdir=workdir, console=console, machine=CPU, trainer=FAKE, **kw)
    return code, console.export_text()


# =========================================================================== tests


def test_full_run_then_everything_cached(env: Path) -> None:
    path, wd = manifest(env), env / "wd"
    code, text = run(path, wd)
    assert code == 0, text
    assert invocations(env) == ["branch-math", "branch-science", "branch-code", "merge", "eval"]
    record = load_record(wd)
    assert record.status == "succeeded" and {s.state for s in record.stages} == {"succeeded"}
    assert record.merged_model() == record.stage("merge").output
    assert {sc.model for sc in record.scores()} == {"merged", "student", "math", "science", "code"}
    assert "pass@1 (%)" in text and "merged model: file://" in text
    # The config each stage got is the planner's stage config, unchanged.
    cfg = json.loads((wd / "stages" / "merge" / "config.json").read_text())
    assert cfg["kind"] == "Merge" and cfg["fingerprint"] == record.stage("merge").fingerprint

    code, text = run(path, wd)
    assert code == 0
    assert len(invocations(env)) == 5  # nothing started again
    again = load_record(wd)
    assert {s.state for s in again.stages} == {"cached"}
    assert again.scores() == record.scores()  # read back from the committed eval output


def test_changed_branch_reruns_it_merge_and_eval_only(env: Path) -> None:
    wd = env / "wd"
    assert run(manifest(env), wd)[0] == 0
    assert run(manifest(env, code_data="code-v2.jsonl"), wd)[0] == 0
    assert invocations(env)[5:] == ["branch-code", "merge", "eval"]
    record = load_record(wd)
    assert [s.state for s in record.stages] == ["cached", "cached", "succeeded", "succeeded", "succeeded"]


def test_failing_stage_reports_reason_and_log_and_keeps_other_outputs(env: Path) -> None:
    wd = env / "wd"
    code, text = run(manifest(env, code_data="bad.jsonl"), wd)
    assert code == 1
    record = load_record(wd)
    states = {s.name: s.state for s in record.stages}
    assert states == {
        "branch-math": "succeeded",
        "branch-science": "succeeded",
        "branch-code": "failed",
        "merge": "blocked",
        "eval": "blocked",
    }
    code_stage = record.stage("branch-code")
    assert code_stage.reason == f"InvalidInput: file://{env}/bad.jsonl line 1: field 'messages' is missing"
    assert "✗ branch-code failed: InvalidInput:" in text
    assert f"log: {wd}/stages/branch-code/log.txt" in text
    assert "merge not run: branch-code did not succeed" in text
    # The finished branches' outputs are committed, so fixing the data re-runs only the rest.
    assert run(manifest(env), wd)[0] == 0
    assert invocations(env)[3:] == ["branch-code", "merge", "eval"]


def test_missing_student_or_dataset_fails_before_anything_starts(env: Path) -> None:
    path = manifest(env)
    (env / "science.jsonl").unlink()
    (env / "student" / "config.json").unlink()
    code, _ = run(path, env / "wd")
    assert code == 2
    assert invocations(env) == []
    assert not (env / "wd" / "state.json").exists()


def test_only_runs_selected_stages(env: Path) -> None:
    wd = env / "wd"
    code, _ = run(manifest(env), wd, only=["math", "science"])
    assert code == 0
    assert invocations(env) == ["branch-math", "branch-science"]
    assert [s.state for s in load_record(wd).stages] == ["succeeded", "succeeded", "skipped", "skipped", "skipped"]
    assert run(manifest(env), wd, only=["merge"])[0] == 2  # branch-code is not committed


def test_dry_run_starts_nothing(env: Path) -> None:
    code, text = run(manifest(env), env / "wd", dry_run=True)
    assert code == 0 and invocations(env) == []
    assert "branchmerge" in text and "sft --config" in text and "--result-path" in text


def test_parallel_branches_overlap(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.3")
    wd = env / "wd"
    assert run(manifest(env), wd, parallel=3)[0] == 0
    record = load_record(wd)
    branches = [record.stage(n) for n in ("branch-math", "branch-science", "branch-code")]
    latest_start = max(s.started_at or 0 for s in branches)
    earliest_end = min(s.finished_at or 0 for s in branches)
    assert latest_start < earliest_end  # all three ran at the same time
    merge = record.stage("merge")
    assert (merge.started_at or 0) >= max(s.finished_at or 0 for s in branches)


def test_ctrl_c_stops_stages_and_the_next_run_resumes(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT to `branchmerge run` (as a terminal's Ctrl-C would send) stops the running
    stage through its process group; the rerun resumes training from the checkpoint."""
    path, wd = manifest(env, steps=40), env / "wd"
    child_env = {**os.environ, "FAKE_STEP_SECONDS": "0.1", "BRANCHMERGE_TRAIN_COMMAND": f"{sys.executable} {HERE}"}
    cli = [BRANCHMERGE, "run", str(path), "--workdir", str(wd)]
    proc = subprocess.Popen(cli, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    progress = wd / "stages" / "branch-math" / "progress.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if progress.exists() and len(progress.read_text().splitlines()) >= 5:
            break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("the first stage never reported progress")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    record = load_record(wd)
    assert record.status == "interrupted"
    assert record.stage("branch-math").state == "interrupted"
    assert record.stage("branch-math").result is not None
    assert record.stage("branch-math").result.error is not None
    assert record.stage("branch-math").result.error.reason == "Interrupted"
    assert record.stage("merge").state == "interrupted"
    assert "run the same command again to resume" in out
    # Nothing is left running.
    assert all(line.split()[0] == "branch-math" for line in (env / "invocations.log").read_text().splitlines())

    monkeypatch.setenv("FAKE_STEP_SECONDS", "0.0")
    assert run(path, wd)[0] == 0
    resumed = load_record(wd).stage("branch-math").result
    assert resumed is not None and resumed.metrics["resumed_from_step"] >= 4


def test_status_reprints_the_run(env: Path) -> None:
    wd = env / "wd"
    assert run(manifest(env), wd)[0] == 0
    out = subprocess.run(
        [BRANCHMERGE, "status", str(wd)],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "branch-science" in out.stdout and "merged model:" in out.stdout and "student" in out.stdout
    missing = subprocess.run(
        [BRANCHMERGE, "status", str(env / "nowhere")],
        capture_output=True, text=True, check=False,
    )
    assert missing.returncode == 2 and "no run recorded here" in missing.stderr


def test_second_run_on_a_busy_workdir_is_refused(env: Path) -> None:
    import fcntl

    wd = env / "wd"
    wd.mkdir()
    with (wd / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        code, _ = run(manifest(env), wd)
    assert code == 2 and invocations(env) == []


def test_manifest_s3_output_with_credentials_from_the_environment(env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moto.server import ThreadedMotoServer

    from branchmerge_trainer.stages import StorageConfig
    from branchmerge_trainer.storage import S3Storage

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        S3Storage(StorageConfig(endpoint=endpoint))._client.create_bucket(Bucket="bm-runs")
        path = manifest(env, output={"uri": "s3://bm-runs/runs", "endpoint": endpoint, "credentialsSecret": "s3-creds"})
        wd = env / "wd"
        # By default an S3 output is redirected under the work directory, and said so.
        code, text = run(path, wd, dry_run=True)
        assert code == 0 and f"outputs go to file://{wd.resolve()}/outputs instead of s3://bm-runs/runs" in text
        code, text = run(path, wd, use_manifest_output=True)
        assert code == 0, text
        record = load_record(wd)
        assert record.stage("merge").output.startswith("s3://bm-runs/runs/merge/")
        s3 = S3Storage(StorageConfig(endpoint=endpoint))
        assert s3.committed(record.stage("eval").output, record.stage("eval").fingerprint) is not None
        code, _ = run(path, wd, use_manifest_output=True)
        assert code == 0 and {s.state for s in load_record(wd).stages} == {"cached"}
        # Without credentials the run stops before starting anything, naming the output.
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(env / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(env / "none"))
        code, _ = run(path, env / "wd2", use_manifest_output=True)
        assert code == 2
    finally:
        server.stop()


def test_scores_come_from_the_committed_output_when_the_result_is_unreadable(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result file that does not parse (or that was capped and omits scores) does not lose
    the scores: the eval's manifest holds all of them."""
    monkeypatch.setenv("FAKE_CORRUPT_RESULT", "1")
    wd = env / "wd"
    code, text = run(manifest(env), wd)
    assert code == 0, text
    assert len(load_record(wd).scores()) == 5
    assert "pass@1 (%)" in text
