"""The Eval stage end to end on tiny models, through runtime.execute and the CLI.

A tiny Qwen2 model is fine-tuned for a few dozen steps to answer every prompt with the same
response — a boxed 7, the letter A and a program printing 7. The expected scores then follow
from the benchmark data alone: the fraction of math answers equal to 7 (in any notation), of
code problems whose expected output is 7, and — multiple choice being shuffled per sample —
of samples whose correct choice landed on A, which is near chance (1/4). An untrained model
scores 0.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from branchmerge_trainer.evaluate.stage import fit_result, run
from branchmerge_trainer.runtime import execute
from branchmerge_trainer.stages import MAX_RESULT_BYTES, EvalStage, Score, StageResult
from branchmerge_trainer.tiny import build_model, build_tokenizer, sample_corpus

RESPONSE = "<think>ok</think>\\boxed{7} Answer: A\n```python\nprint(7)\n```"
MATH = [("What is 3 + 4?", "7"), ("What is 14 / 2?", "\\frac{14}{2}"), ("What is 7.0 * 1?", "7.0"), ("What is 4 + 4?", "8")]
CODE = [("Print seven.", "7\n"), ("Print eight.", "8\n")]


def _user(rnd: random.Random) -> str:
    """Prompts shaped like the benchmark's (templates below), with other numbers."""
    kind = rnd.randrange(3)
    if kind == 0:
        return f"What is {rnd.randrange(100)} + {rnd.randrange(100)}?"
    if kind == 1:
        return f"Which is {rnd.randrange(100)}?\n" + "\n".join(f"{x}) {rnd.randrange(1000)}" for x in "ABCD")
    return f"Print {rnd.choice(['one', 'two', 'a number', 'ten'])}."


def _train_constant_responder(tok: Any, steps: int = 100) -> Any:
    from branchmerge_trainer.evaluate.generate import chat_prompt

    torch.manual_seed(0)
    model = build_model(tok, hidden_size=64, num_layers=2, seed=0)
    target = [*tok(RESPONSE, add_special_tokens=False).input_ids, tok.eos_token_id]
    rnd = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        prompts = [chat_prompt(tok, _user(rnd))[0] for _ in range(8)]
        width = max(len(p) for p in prompts) + len(target)
        ids = torch.full((8, width), tok.pad_token_id)
        labels = torch.full((8, width), -100)
        for j, p in enumerate(prompts):
            ids[j, : len(p) + len(target)] = torch.tensor(p + target)
            labels[j, len(p) : len(p) + len(target)] = torch.tensor(target)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, f"the tiny model did not learn its answer (loss {loss.item():.3f})"
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one torch thread avoids OpenMP threads
    spinning against each other (~5x faster here under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    tok = build_tokenizer(sample_corpus())
    out = {}
    for name, model in (("trained", _train_constant_responder(tok)), ("random", build_model(tok, hidden_size=64, num_layers=2, seed=3))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    rnd = random.Random(5)
    rows = {
        "math": [{"problem": q, "answer": a} for q, a in MATH],
        "mc": [
            {"id": f"q{i}", "question": f"Which is {rnd.randrange(100)}?", "choices": [str(rnd.randrange(1000)) for _ in range(4)], "answer": 0}
            for i in range(8)
        ],
        "code": [{"question": q, "tests": [{"input": "", "output": o}]} for q, o in CODE],
    }
    paths = {}
    for name, items in rows.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in items))
    return paths


def _stage(tmp_path: Path, models: dict[str, Path], data: dict[str, Path], **kw: Any) -> EvalStage:
    spec: dict[str, Any] = {
        "name": "eval",
        "fingerprint": "fp-" + tmp_path.name[-8:],
        "output": str(tmp_path / "out"),
        "resultPath": str(tmp_path / "result.json"),
        "models": {name: {"uri": str(path)} for name, path in models.items()},
        "benchmarks": [
            {"name": "math", "uri": str(data["math"]), "kind": "math", "samples": 2, "temperature": 0,
             "maxNewTokens": 40, "prompt": "{problem}"},
            {"name": "gpqa", "uri": str(data["mc"]), "kind": "multiple_choice", "preset": "gpqa_diamond",
             "temperature": 0, "maxNewTokens": 40, "prompt": "{question}\n{choices}"},
            {"name": "code", "uri": str(data["code"]), "kind": "code", "temperature": 0, "maxNewTokens": 40,
             "prompt": "{question}", "codeTimeoutSeconds": 5},
        ],
        "batchSize": 4,
        **kw,
    }  # fmt: skip
    return EvalStage.model_validate(spec)


def _records(out: Path, model: str, bench: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "records" / model / f"{bench}.jsonl").read_text().splitlines()]


def test_scores_match_what_the_data_implies(tmp_path: Path, models: dict[str, Path], data: dict[str, Path]) -> None:
    stage = _stage(tmp_path, models, data)
    assert execute(stage, run) == 0
    result = StageResult.model_validate_json((tmp_path / "result.json").read_text())
    assert result.status == "Succeeded" and not result.cached
    assert len(result.to_json().encode()) < 4096
    scores = {(s.model, s.benchmark): s for s in result.scores}
    out = tmp_path / "out"

    # math: 3 of 4 reference answers equal 7 (as 7, 14/2 and 7.0); 2 greedy samples each
    math = scores[("trained", "math")]
    assert math.score == pytest.approx(0.75)
    assert (math.problems, math.samples, math.truncated_fraction) == (4, 8, 0.0)
    assert all(r["extracted"] == "7" for r in _records(out, "trained", "math"))

    # multiple choice: always "A", choices shuffled per sample (4 samples from the preset)
    gpqa = scores[("trained", "gpqa")]
    records = _records(out, "trained", "gpqa")
    landed_on_a = sum(r["gold"] == "A" for r in records) / len(records)
    assert gpqa.samples == 32 and all(r["extracted"] == "A" for r in records)
    assert gpqa.score == pytest.approx(landed_on_a)
    assert 0.05 <= gpqa.score <= 0.5  # near chance

    # code: the program prints 7; one of the two problems expects 7
    assert scores[("trained", "code")].score == pytest.approx(0.5)
    verdicts = {r["problem"]: r["correct"] for r in _records(out, "trained", "code")}
    assert verdicts == {"0": True, "1": False}

    for bench in ("math", "gpqa", "code"):
        assert scores[("random", bench)].score == 0.0

    manifest = json.loads((out / "_MANIFEST.json").read_text())
    assert manifest["fingerprint"] == stage.fingerprint
    assert [Score.model_validate(s) for s in manifest["extra"]["scores"]] == result.scores
    assert {f["path"] for f in manifest["files"]} >= {"summary.json", "records/trained/math.jsonl"}
    summary = json.loads((out / "summary.json").read_text())
    assert "landlock_abi" in summary["sandbox"] and summary["sandbox"]["audit_hook"]
    assert summary["models"]["trained"]["benchmarks"]["gpqa"]["pass@k"]["4"] >= gpqa.score
    assert result.metrics["trained/gpqa/pass@4"] == summary["models"]["trained"]["benchmarks"]["gpqa"]["pass@k"]["4"]

    # the same stage again: the committed output is reused, no work done
    assert execute(stage, run) == 0
    again = StageResult.model_validate_json((tmp_path / "result.json").read_text())
    assert again.cached and again.scores == result.scores


def test_bad_benchmark_row_fails_as_invalid_input(tmp_path: Path, models: dict[str, Path], data: dict[str, Path]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "ok", "answer": "1"}\n{"problem": "no answer here"}\n')
    stage = _stage(tmp_path, {"random": models["random"]}, {**data, "math": bad})
    assert execute(stage, run) == 1
    result = StageResult.model_validate_json((tmp_path / "result.json").read_text())
    assert result.status == "Failed" and result.error is not None
    assert result.error.reason == "InvalidInput"
    assert "bad.jsonl row 1: field 'answer' is missing" in result.error.message
    assert not (tmp_path / "out" / "_MANIFEST.json").exists()


def test_cli_subprocess(tmp_path: Path, models: dict[str, Path], data: dict[str, Path]) -> None:
    stage = _stage(tmp_path, {"random": models["random"]}, data)
    spec = stage.dump()
    spec["benchmarks"] = [dict(spec["benchmarks"][0], maxNewTokens=4, samples=1)]
    config = tmp_path / "eval.json"
    config.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHMERGE_")} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "branchmerge_trainer.cli", "eval", "--config", str(config)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    progress = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("BRANCHMERGE_PROGRESS ")]
    assert progress and progress[-1]["step"] == progress[-1]["totalSteps"] == 4
    result = StageResult.model_validate_json((tmp_path / "result.json").read_text())
    assert result.status == "Succeeded" and [s.benchmark for s in result.scores] == ["math"]


def test_plain_model_directory_without_manifest_is_accepted(models: dict[str, Path]) -> None:
    from branchmerge_trainer.storage import LocalStorage, materialize_model

    assert materialize_model(LocalStorage(), str(models["random"]), Path("/nonexistent")) == models["random"]


def test_results_fit_a_termination_message() -> None:
    scores = [
        Score(model=f"model-with-a-long-name-{m}", benchmark=f"benchmark-{b}", score=0.1234, samples=1920, problems=30,
              mean_response_tokens=12345.6, truncated_fraction=0.0123)
        for m in range(4) for b in range(5)
    ]  # fmt: skip
    metrics = {f"{s.model}/{s.benchmark}/pass@{k}": 0.5 for s in scores for k in (2, 4, 8, 16)}
    result = fit_result(StageResult(kind="Eval", status="Succeeded", fingerprint="f", scores=scores, metrics=metrics))
    assert len(result.to_json().encode()) <= MAX_RESULT_BYTES
    assert [(s.model, s.benchmark, s.score) for s in result.scores] == [(s.model, s.benchmark, s.score) for s in scores]
