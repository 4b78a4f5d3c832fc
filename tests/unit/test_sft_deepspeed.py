"""The DeepSpeed ZeRO path of the SFT stage, run for real on CPU: 2 gloo ranks under torchrun,
DeepSpeed's CPU accelerator (``BRANCHMERGE_DEEPSPEED_ON_CPU=1``; on GPUs it is the default for
``zeroStage >= 2``). Checks what GPU users depend on: the same loss curve as DDP, exact resume
from a DeepSpeed checkpoint, and a published model whose weights and names are the model's own
(ZeRO-3 gathers the partitioned parameters)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file
from test_sft_e2e import _config, _env
from test_sft_helpers import chats, sft_stage, tiny_model_dir, write_jsonl

from branchmerge_trainer.sft.stage import STOP_AFTER_ENV
from branchmerge_trainer.sft.train import DEEPSPEED_CPU_ENV

pytestmark = pytest.mark.slow


def _train(root: Path, student: Path, data: Path, zero: int, *, stop_after: int | None = None, **training: Any) -> Path:
    """Run (or resume) a 2-rank SFT stage; returns its published output directory."""
    out, _ = _train_logged(root, student, data, zero, stop_after=stop_after, **training)
    return out


def _train_logged(root: Path, student: Path, data: Path, zero: int, *, stop_after: int | None = None,
                  **training: Any) -> tuple[Path, str]:  # fmt: skip
    stage = sft_stage(root, str(student), [str(data)], microBatchSize=1, packing="none", precision="fp32",
                      zeroStage=zero, checkpointInterval=2, **training)  # fmt: skip
    cfg = _config(stage, root.with_suffix(".yaml"))
    env = _env(root)
    env[DEEPSPEED_CPU_ENV] = "1"
    if stop_after is not None:
        env[STOP_AFTER_ENV] = str(stop_after)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "branchmerge_trainer.cli", "sft", "--config", str(cfg)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    if stop_after is None:
        assert proc.returncode == 0, proc.stderr[-4000:]
    else:
        assert proc.returncode != 0 and "fault injection" in proc.stderr, proc.stderr[-4000:]
    return Path(stage.output.removeprefix("file://")), proc.stderr


def _log(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "training_log.json").read_text()))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ds")
    return tiny_model_dir(root), write_jsonl(root / "d.jsonl", chats(32))


@pytest.fixture(scope="module")
def ddp(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same 2 ranks with plain DDP (zeroStage 0)."""
    return _train(tmp_path_factory.mktemp("ddp") / "run", *inputs, 0, maxSteps=4)


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_trains_the_ddp_curve_and_publishes_the_same_model(
    zero: int, inputs: tuple[Path, Path], ddp: Path, tmp_path: Path
) -> None:
    out, stderr = _train_logged(tmp_path / "run", *inputs, zero, maxSteps=4)
    # ZeRO-3 builds the model already partitioned (what makes a 32B student fit per rank).
    assert ("loaded partitioned across 2 ranks" in stderr) == (zero == 3)
    log, ref = _log(out), _log(ddp)
    assert log["metrics"]["world_size"] == 2 and log["training"]["zeroStage"] == zero
    assert [h["loss"] for h in log["history"]] == pytest.approx([h["loss"] for h in ref["history"]], abs=1e-5)
    ours, theirs = load_file(str(out / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert ours.keys() == theirs.keys()  # the model's own names (not the loss wrapper's)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, name
        assert (ours[name] - tensor).abs().max().item() < 1e-5, name


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_resumes_from_its_checkpoint_exactly(zero: int, inputs: tuple[Path, Path], tmp_path: Path) -> None:
    whole = _log(_train(tmp_path / "whole", *inputs, zero, maxSteps=6))
    _train(tmp_path / "cut", *inputs, zero, maxSteps=6, stop_after=3)  # killed after step 3 (checkpoint at 2)
    resumed = _log(_train(tmp_path / "cut", *inputs, zero, maxSteps=6))
    assert resumed["metrics"]["resumed_from_step"] == 2
    assert [h["loss"] for h in resumed["history"]] == pytest.approx([h["loss"] for h in whole["history"]], abs=1e-6)
