"""The stage contract: results stay parseable within the termination-message limit."""

from __future__ import annotations

import json

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
