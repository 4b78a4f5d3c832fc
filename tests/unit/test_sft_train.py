"""The training loop and the stage around it: schedule, loss normalisation, resume, atomic output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_sft_helpers import chats, sft_stage, tiny_model_dir, write_jsonl

from branchmerge_trainer.runtime import ProgressReporter, StageContext, execute
from branchmerge_trainer.sft import stage as sft
from branchmerge_trainer.sft.train import SimulatedCrash, lr_factor
from branchmerge_trainer.stages import Progress, SFTStage, StageResult
from branchmerge_trainer.storage import MANIFEST, LocalStorage, NotCommittedError, storage_for


class Recorder(ProgressReporter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Progress] = []

    def report(self, progress: Progress, *, force: bool = False) -> None:
        self.seen.append(progress)


def _ctx(stage: SFTStage, workdir: Path, **extra: Any) -> StageContext:
    workdir.mkdir(parents=True, exist_ok=True)
    return StageContext(storage=storage_for(stage.output), workdir=workdir, reporter=Recorder(), extra=extra)


def _history(stage: SFTStage) -> list[float]:
    log = json.loads(LocalStorage().read_bytes(stage.output + "/training_log.json"))
    return [h["loss"] for h in log["history"]]


@pytest.fixture()
def setup(tmp_path: Path) -> tuple[Path, str, str]:
    student = tiny_model_dir(tmp_path)
    data = write_jsonl(tmp_path / "data" / "math.jsonl", chats(48))
    return tmp_path, str(student), str(data)


def test_lr_schedules() -> None:
    kw = {"warmup": 2, "total": 10}
    assert [lr_factor(s, schedule="constant", **kw) for s in (0, 1, 2, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert lr_factor(2, schedule="cosine", **kw) == 1.0 and lr_factor(10, schedule="cosine", **kw) == pytest.approx(0.0)
    assert lr_factor(6, schedule="linear", **kw) == pytest.approx(0.5)


def test_trains_and_publishes_a_loadable_model(setup: tuple[Path, str, str]) -> None:
    root, student, data = setup
    stage = sft_stage(root, student, [data], epochs=2, schedule="cosine")
    ctx = _ctx(stage, root / "w")
    result = sft.run(stage, ctx)
    m = result.metrics
    assert result.status == "Succeeded" and m["steps"] == len(_history(stage))
    assert m["tokens_seen"] > 0 and m["examples"] == 48 and m["dropped_samples"] == 0
    assert 0.5 < m["packing_efficiency"] <= 1.0 and m["tokens_per_second"] > 0
    losses = _history(stage)
    assert losses[-1] < losses[0]  # it learns
    reports = ctx.reporter.seen  # type: ignore[attr-defined]
    assert reports[-1].step == reports[-1].total_steps == m["steps"] and reports[-1].eta_seconds == 0

    manifest = LocalStorage().read_manifest(stage.output)
    assert manifest.fingerprint == stage.fingerprint and manifest.metrics["steps"] == m["steps"]
    names = {f.path for f in manifest.files}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"} <= names
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = stage.output.removeprefix("file://")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.use_cache and tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "Add 1 and 2."}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert model.generate(**ids, max_new_tokens=3).shape[1] == ids["input_ids"].shape[1] + 3


def test_loss_does_not_depend_on_micro_batching_or_packing(setup: tuple[Path, str, str]) -> None:
    root, student, data = setup
    runs = {}
    for name, kw in {"mb1": {"microBatchSize": 1}, "mb4": {"microBatchSize": 4}}.items():
        stage = sft_stage(root / name, student, [data], packing="none", maxSteps=3, **kw)
        sft.run(stage, _ctx(stage, root / name / "w"))
        runs[name] = _history(stage)
    assert runs["mb1"] == pytest.approx(runs["mb4"], abs=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_reproduces_the_uninterrupted_loss_curve(setup: tuple[Path, str, str], precision: str) -> None:
    """bf16 on this CPU means bf16 compute with fp32 master weights: those are checkpointed."""
    root, student, data = setup
    common: dict[str, Any] = {
        "maxSteps": 6, "checkpointInterval": 2, "schedule": "linear", "microBatchSize": 1, "precision": precision,
    }
    ref = sft_stage(root / "ref", student, [data], **common)
    sft.run(ref, _ctx(ref, root / "ref" / "w"))
    expected = _history(ref)
    assert len(expected) == 6

    stage = sft_stage(root / "cut", student, [data], **common)
    with pytest.raises(SimulatedCrash):
        sft.run(stage, _ctx(stage, root / "cut" / "w1", stop_after_step=5))  # killed after step 5
    assert storage_for(stage.output).committed(stage.output) is None
    ckpts = sorted(p.name for p in Path(stage.checkpoints.removeprefix("file://")).iterdir())
    assert ckpts == ["step-000000002", "step-000000004"]  # pruned to the newest two
    result = sft.run(stage, _ctx(stage, root / "cut" / "w2"))  # a fresh pod: new workdir
    assert result.metrics["resumed_from_step"] == 4
    assert _history(stage) == pytest.approx(expected, abs=1e-6)
    assert result.metrics["tokens_seen"] == pytest.approx(
        json.loads(LocalStorage().read_bytes(ref.output + "/training_log.json"))["metrics"]["tokens_seen"]
    )


def test_uncommitted_checkpoint_is_ignored(setup: tuple[Path, str, str]) -> None:
    root, student, data = setup
    stage = sft_stage(root, student, [data], checkpointInterval=2, maxSteps=4)
    with pytest.raises(SimulatedCrash):
        sft.run(stage, _ctx(stage, root / "w1", stop_after_step=2))
    ckpt = Path(stage.checkpoints.removeprefix("file://"))
    (ckpt / "step-000000002" / MANIFEST).unlink()  # as if killed while publishing it
    result = sft.run(stage, _ctx(stage, root / "w2"))
    assert result.metrics["resumed_from_step"] == 0


def test_crash_before_manifest_leaves_unreadable_output(
    setup: tuple[Path, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, student, data = setup
    stage = sft_stage(root, student, [data], maxSteps=2)
    real = LocalStorage.write_bytes

    def dies_on_manifest(self: LocalStorage, uri: str, payload: bytes) -> None:
        if uri.endswith(MANIFEST) and uri.startswith(stage.output):
            raise OSError("node lost")
        real(self, uri, payload)

    monkeypatch.setattr(LocalStorage, "write_bytes", dies_on_manifest)
    assert execute(stage, sft.run) == 1
    out = Path(stage.output.removeprefix("file://"))
    assert (out / "model.safetensors").exists()  # files landed …
    with pytest.raises(NotCommittedError):  # … but nobody may read them
        LocalStorage().read_manifest(stage.output)
    result = json.loads(Path(stage.result_path).read_text())
    assert result["status"] == "Failed" and "node lost" in result["error"]["message"]

    monkeypatch.setattr(LocalStorage, "write_bytes", real)
    assert execute(stage, sft.run) == 0
    assert LocalStorage().committed(stage.output, stage.fingerprint) is not None
    assert execute(stage, sft.run) == 0  # same fingerprint: cached, no training
    assert StageResult.model_validate_json(Path(stage.result_path).read_text()).cached


def test_bad_global_batch_is_an_input_error(setup: tuple[Path, str, str]) -> None:
    root, student, data = setup
    stage = sft_stage(root, student, [data], globalBatchSize=5, microBatchSize=2)
    assert execute(stage, sft.run) == 1
    err = json.loads(Path(stage.result_path).read_text())["error"]
    assert err["reason"] == "InvalidInput" and "globalBatchSize=5" in err["message"]
