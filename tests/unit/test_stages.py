"""The stage contract: results stay parseable within the termination-message limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from branchmerge_trainer.stages import MAX_RESULT_BYTES, Score, StageResult


def test_oversized_result_stays_valid_json_and_counts_omitted_scores() -> None:
    scores = [
        Score(model=f"model-{m}", benchmark=f"benchmark-{b}", score=0.5, samples=64, problems=16,
              mean_response_tokens=1234.5, truncated_fraction=0.01)
        for m in range(10) for b in range(10)
    ]
    result = StageResult(kind="Eval", status="Succeeded", fingerprint="f", scores=scores)
    text = result.to_json()
    assert len(text.encode()) <= MAX_RESULT_BYTES
    back = StageResult.model_validate(json.loads(text))
    assert back.scores and back.scores_omitted == 100 - len(back.scores)
    assert back.scores[0].model == "model-0" and back.scores[0].score == 0.5


def test_only_local_rank_zero_or_a_failure_writes_the_result_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from branchmerge_trainer.runtime import write_result

    ok = StageResult(kind="SFT", status="Succeeded", fingerprint="f")
    failed = StageResult(kind="SFT", status="Failed", fingerprint="f")
    path = tmp_path / "termination-log"
    monkeypatch.setenv("LOCAL_RANK", "1")
    write_result(ok, str(path))
    assert not path.exists()
    write_result(failed, str(path))
    assert json.loads(path.read_text())["status"] == "Failed"
    monkeypatch.setenv("LOCAL_RANK", "0")
    write_result(ok, str(path))
    assert json.loads(path.read_text())["status"] == "Succeeded"
