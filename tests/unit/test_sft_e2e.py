"""The SFT stage as the executors run it: through S3, as a CLI subprocess, and as a 2-rank gang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_sft_helpers import chats, sft_stage, tiny_model_dir, write_jsonl

from branchmerge_trainer.runtime import ProgressReporter, StageContext
from branchmerge_trainer.sft import stage as sft
from branchmerge_trainer.sft.train import SimulatedCrash
from branchmerge_trainer.stages import PROGRESS_PREFIX, SFTStage, StorageConfig
from branchmerge_trainer.storage import S3Storage, join, storage_for

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_s3_inputs_outputs_and_resume(tmp_path: Path, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    s3 = S3Storage(StorageConfig(endpoint=moto_endpoint))
    s3._client.create_bucket(Bucket="sft")
    student = tiny_model_dir(tmp_path)
    for f in student.iterdir():  # a hand-uploaded model: no manifest
        s3.upload_file(f, f"s3://sft/models/student/{f.name}")
    s3.upload_file(write_jsonl(tmp_path / "d.jsonl", chats(24)), "s3://sft/data/math/part-0.jsonl")

    stage = sft_stage(
        tmp_path, "s3://sft/models/student", ["s3://sft/data/math"],
        out="s3://sft/out/branch-math", ckpt="s3://sft/ckpt/branch-math", checkpointInterval=2, maxSteps=4,
    )
    stage.storage = StorageConfig(endpoint=moto_endpoint)

    def ctx(name: str, **extra: object) -> StageContext:
        return StageContext(storage=s3, workdir=tmp_path / name, reporter=ProgressReporter(), extra=dict(extra))

    with pytest.raises(SimulatedCrash):
        sft.run(stage, ctx("w1", stop_after_step=3))
    assert s3.committed(stage.output) is None
    assert s3.committed(join(stage.checkpoints, "step-000000002"), stage.fingerprint) is not None
    result = sft.run(stage, ctx("w2"))
    assert result.metrics["resumed_from_step"] == 2 and result.metrics["steps"] == 4
    manifest = s3.read_manifest(stage.output)
    assert manifest.fingerprint == stage.fingerprint and "model.safetensors" in {f.path for f in manifest.files}
    local, _ = s3.materialize(stage.output, tmp_path / "fetched")
    assert json.loads((local / "training_log.json").read_text())["metrics"]["steps"] == 4


def _config(stage: SFTStage, path: Path) -> Path:
    path.write_text(yaml.safe_dump(stage.dump()))
    return path


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["BRANCHMERGE_WORKDIR"] = str(tmp_path / "work")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "trainer_image"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_cli_subprocess_end_to_end(tmp_path: Path) -> None:
    student = tiny_model_dir(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", [*chats(16), {"prompt": "x", "response": "y " * 200}])
    stage = sft_stage(tmp_path, str(student), [str(data)], maxSteps=3, truncation="drop")
    cfg = _config(stage, tmp_path / "sft.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "branchmerge_trainer.cli", "sft", "--config", str(cfg)],
        capture_output=True, text=True, env=_env(tmp_path), timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    progress = [json.loads(line[len(PROGRESS_PREFIX):]) for line in proc.stdout.splitlines() if line.startswith(PROGRESS_PREFIX)]
    assert progress and progress[-1]["step"] == progress[-1]["totalSteps"] == 3
    result = json.loads(Path(stage.result_path).read_text())
    assert result["status"] == "Succeeded" and result["output"] == stage.output
    assert result["metrics"]["steps"] == 3 and result["metrics"]["dropped_samples"] == 1
    assert result["metrics"]["tokens_seen"] > 0 and "final_loss" in result["metrics"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # DDP; bf16 master weights + flat all-reduce
def test_two_rank_gang_matches_one_process(tmp_path: Path, precision: str) -> None:
    """torchrun with 2 gloo ranks trains the same curve as one process (same global batch)."""
    student = tiny_model_dir(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", chats(32))
    losses = {}
    for n in (1, 2):
        stage = sft_stage(tmp_path / f"n{n}", str(student), [str(data)], maxSteps=3, microBatchSize=1, packing="none",
                          precision=precision)
        if n == 1:  # in-process: one interpreter start less
            ctx = StageContext(storage=storage_for(stage.output), workdir=tmp_path / "w1", reporter=ProgressReporter())
            sft.run(stage, ctx)
        else:
            cfg = _config(stage, tmp_path / f"n{n}.yaml")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                   "-m", "branchmerge_trainer.cli", "sft", "--config", str(cfg)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path / f"n{n}"), timeout=180, check=False)
            assert proc.returncode == 0, proc.stderr[-3000:]
        log = json.loads((Path(stage.output.removeprefix("file://")) / "training_log.json").read_text())
        losses[n] = [h["loss"] for h in log["history"]]
    assert losses[2] == pytest.approx(losses[1], abs=1e-5)
