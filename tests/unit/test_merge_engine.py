"""The merge stage end to end on tiny checkpoints: outputs load and generate, chains equal
their steps run one by one, every method equals its function applied tensor by tensor,
bad inputs fail before any weight is read with messages naming model and tensor, failures
leave no visible output, S3 in and out, the CLI, and memory that does not grow with size."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from branchmerge_trainer.merge import engine as engine_mod
from branchmerge_trainer.merge.methods import get_method
from branchmerge_trainer.merge.methods._common import seed_key
from branchmerge_trainer.merge.methods.spec import MergeCall
from branchmerge_trainer.merge.plan import build_plan
from branchmerge_trainer.merge.stage import run
from branchmerge_trainer.runtime import ProgressReporter, StageContext, StageInputError
from branchmerge_trainer.stages import MergeStage, Progress, StorageConfig
from branchmerge_trainer.storage import MANIFEST, ChecksumError, LocalStorage, NotCommittedError, S3Storage
from branchmerge_trainer.tiny import sample_corpus, save_tiny_model

SPECIALISTS = ("math", "science", "code")


class Recorder(ProgressReporter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Progress] = []

    def report(self, progress: Progress, *, force: bool = False) -> None:
        self.seen.append(progress)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturb(src: Path, dst: Path, seed: int, std: float = 2e-3) -> Path:
    """A 'fine-tune' of ``src``: same files, weights plus Gaussian noise."""
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    sd = load_file(dst / "model.safetensors")
    sd = {k: (v.float() + torch.randn(v.shape, generator=g) * std).to(v.dtype) for k, v in sd.items()}
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("family")
    base = save_tiny_model(root / "base", sample_corpus(), hidden_size=32, num_layers=2, intermediate_size=64)
    return {"base": base, **{n: perturb(base, root / n, i + 1) for i, n in enumerate(SPECIALISTS)}}


def stage_for(family: dict[str, Path], out: Path | str, steps: list[dict[str, Any]], **kw: Any) -> MergeStage:
    data: dict[str, Any] = {
        "kind": "Merge",
        "name": "merge",
        "fingerprint": kw.pop("fingerprint", "fp"),
        "output": str(out),
        "models": {k: {"uri": str(v)} for k, v in family.items()},
        "steps": steps,
        "tokenizerSource": kw.pop("tokenizer_source", "code"),
        **kw,
    }
    return MergeStage.model_validate(data)


def ctx_for(tmp: Path, storage: Any = None) -> StageContext:
    return StageContext(storage=storage or LocalStorage(), workdir=tmp / "work", reporter=Recorder())


TINYR1 = [
    {"name": "math_science", "method": "arcee_fusion", "base": "science", "models": [{"model": "math"}]},
    {"name": "tinyr1", "method": "arcee_fusion", "base": "code", "models": [{"model": "math_science"}]},
]


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118
                out[k] = h.get_tensor(k)
    return out


def assert_no_output(out: Path) -> None:
    assert not (out / MANIFEST).exists()
    assert not out.exists() or not any(out.iterdir())


# --------------------------------------------------------------------------- happy paths


def test_tinyr1_chain_loads_and_generates(family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    ctx = ctx_for(tmp_path)
    result = run(stage_for(family, out, TINYR1), ctx)
    assert result.status == "Succeeded" and result.metrics["tensors"] > 0
    assert 0.01 < result.metrics["fused_fraction.math_science"] < 0.3
    manifest = LocalStorage().committed(str(out), "fp")
    assert manifest is not None and {f.path for f in manifest.files} >= {"model.safetensors", "config.json",
                                                                          "tokenizer.json", "generation_config.json"}  # fmt: skip
    assert LocalStorage().materialize(
        str(out), tmp_path / "cache", verify=True
    )  # digests computed while writing
    progress = ctx.reporter.seen  # type: ignore[attr-defined]
    assert (
        progress[-1].step == progress[-1].total_steps and progress[-1].bytes_done == progress[-1].bytes_total
    )
    config = json.loads((out / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "bfloat16"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("What is 2 + 3?", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4


def test_chain_equals_steps_run_one_after_another(family: dict[str, Path], tmp_path: Path) -> None:
    """A chain needs no intermediate checkpoint, yet gives the same bits as writing one."""
    chained = tmp_path / "chained"
    run(stage_for(family, chained, TINYR1), ctx_for(tmp_path))
    mid = tmp_path / "mid"
    run(stage_for(family, mid, TINYR1[:1], tokenizer_source="science"), ctx_for(tmp_path))
    fam2 = {**family, "math_science": mid}
    second = [
        {"name": "tinyr1", "method": "arcee_fusion", "base": "code", "models": [{"model": "math_science"}]}
    ]
    final = tmp_path / "final"
    run(stage_for(fam2, final, second), ctx_for(tmp_path))
    a, b = tensors(chained), tensors(final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


METHOD_STEPS: dict[str, dict[str, Any]] = {
    "arcee_fusion": {"base": "science", "models": [{"model": "math"}]},
    "linear": {"models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(SPECIALISTS, (1, 2, 3), strict=True)]},
    "task_arithmetic": {"base": "base", "models": [{"model": m} for m in SPECIALISTS], "parameters": {"lambda": 0.5}},
    "ties": {"base": "base", "models": [{"model": m, "parameters": {"density": 0.4}} for m in SPECIALISTS]},
    "dare_linear": {"base": "base", "models": [{"model": m, "parameters": {"density": 0.5}} for m in SPECIALISTS]},
    "dare_ties": {"base": "base", "models": [{"model": m} for m in SPECIALISTS], "parameters": {"density": 0.5}},
    "slerp": {"base": "math", "models": [{"model": "code"}],
              "parameters": {"t": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.5}]}},
    "model_stock": {"base": "base", "models": [{"model": m} for m in SPECIALISTS]},
}  # fmt: skip


@pytest.mark.parametrize("method", sorted(METHOD_STEPS))
def test_every_method_equals_its_function_tensor_by_tensor(
    family: dict[str, Path], tmp_path: Path, method: str
) -> None:
    step = {"name": "s", "method": method, **METHOD_STEPS[method]}
    out = tmp_path / "out"
    stage = stage_for(family, out, [step], seed=7)
    run(stage, ctx_for(tmp_path))
    got = tensors(out)
    plan = build_plan(stage)
    (sp,) = plan.steps
    inputs = {m: tensors(family[m]) for m in sp.inputs}
    spec = get_method(method)
    for tp in plan.tensors:
        per_input, shared = tp.params["s"]
        call = MergeCall(tp.name, [inputs[m][tp.name].to(torch.bfloat16) for m in sp.inputs], sp.base, per_input,
                         shared, seed_key(7, "s", tp.name), torch.bfloat16)  # fmt: skip
        assert torch.equal(got[tp.name], spec.run(call)), tp.name
    if method == "slerp":  # per-tensor parameters: mlp tensors of layer 0 keep the base (t = 0)
        name = "model.layers.0.mlp.up_proj.weight"
        assert torch.equal(got[name], inputs["math"][name].to(torch.bfloat16))


def test_vocabulary_rows_are_cut_to_the_smallest_model(family: dict[str, Path], tmp_path: Path) -> None:
    big = tmp_path / "big"
    shutil.copytree(family["math"], big)
    sd = load_file(big / "model.safetensors")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[k] = torch.cat([sd[k], torch.randn(8, sd[k].shape[1])])
    save_file(sd, big / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((big / "config.json").read_text())
    vocab = cfg["vocab_size"]
    cfg["vocab_size"] = vocab + 8
    (big / "config.json").write_text(json.dumps(cfg))
    fam = {**family, "math": big}
    out = tmp_path / "out"
    run(stage_for(fam, out, TINYR1), ctx_for(tmp_path))
    assert tensors(out)["lm_head.weight"].shape[0] == vocab
    assert json.loads((out / "config.json").read_text())["vocab_size"] == vocab


# --------------------------------------------------------------------------- bad inputs


def expect_input_error(family: dict[str, Path], tmp_path: Path, steps: list[dict[str, Any]], match: str,
                       exc: type[Exception] = StageInputError, **kw: Any) -> None:  # fmt: skip
    out = tmp_path / "out"
    with pytest.raises(exc, match=match):
        run(stage_for(family, out, steps, **kw), ctx_for(tmp_path))
    assert_no_output(out)


def test_mismatched_architectures(family: dict[str, Path], tmp_path: Path) -> None:
    other = save_tiny_model(
        tmp_path / "wide", sample_corpus(), hidden_size=48, num_layers=2, intermediate_size=64
    )
    expect_input_error({**family, "math": other}, tmp_path, TINYR1,
                       r"models 'code' and 'math' have different architectures: config.json hidden_size = 32 vs 48")  # fmt: skip


def test_missing_tensor_is_named(family: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(family["math"], bad)
    sd = load_file(bad / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    expect_input_error({**family, "math": bad}, tmp_path, TINYR1,
                       r"model 'math' has no tensor 'model.layers.1.mlp.up_proj.weight'")  # fmt: skip


def test_shape_mismatch_is_named(family: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(family["math"], bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(5)
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    expect_input_error(
        {**family, "math": bad},
        tmp_path,
        TINYR1,
        r"tensor 'model.norm.weight' has shape \[5\] in model 'math'",
    )


def test_missing_shard(family: dict[str, Path], tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    shutil.copytree(family["math"], sharded)
    sd = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}  # fmt: skip
    for fname, keys in halves.items():
        save_file({k: sd[k] for k in keys}, sharded / fname, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    fam = {**family, "math": sharded}
    run(stage_for(fam, tmp_path / "ok", TINYR1), ctx_for(tmp_path))  # sharded inputs work
    (sharded / "model-00002-of-00002.safetensors").unlink()
    expect_input_error(
        fam,
        tmp_path,
        TINYR1,
        r"model 'math' .*shard model-00002-of-00002.safetensors \(holding tensor '.+'\) is missing",
    )


@pytest.mark.parametrize("damage", ["length", "json", "truncate"])
def test_corrupt_safetensors_header(family: dict[str, Path], tmp_path: Path, damage: str) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(family["math"], bad)
    f = bad / "model.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "length":
        data[:8] = (10**12).to_bytes(8, "little")
    elif damage == "json":
        data[8:12] = b"\x00{{{"
    else:
        data = data[: len(data) - 100]
    f.write_bytes(bytes(data))
    expect_input_error(
        {**family, "math": bad}, tmp_path, TINYR1, r"model 'math': model.safetensors: .*(corrupt|truncated)"
    )


@pytest.mark.parametrize(
    "steps,match",
    [
        ([{"name": "s", "method": "ties", "base": "base", "models": [{"model": "math", "parameters": {"densty": 0.5}}]}],
         r"parameter 'densty' does not apply to model 'math' in ties"),
        ([{"name": "s", "method": "linear", "models": [{"model": "math"}], "parameters": {"t": 0.5}}],
         r"unknown parameter 't' for linear"),
        ([{"name": "s", "method": "ties", "base": "base", "models": [{"model": "math", "parameters": {"density": 1.5}}]}],
         r"parameter 'density'=1.5 is above 1"),
        ([{"name": "s", "method": "slerp", "base": "math", "models": [{"model": "code"}]}],
         r"parameter 't' is required by slerp"),
        ([{"name": "s", "method": "arcee_fusion", "base": "math", "models": [{"model": "code"}, {"model": "science"}]}],
         r"arcee_fusion takes exactly 2 models .* chain pairwise"),
        ([{"name": "s", "method": "arcee_fusion", "models": [{"model": "code"}]}], r"needs a base model"),
        ([{"name": "s", "method": "linear", "models": [{"model": "physics"}]}], r"unknown model 'physics'"),
        ([{"name": "a", "method": "linear", "models": [{"model": "math"}]},
          {"name": "b", "method": "linear", "models": [{"model": "code"}]}], r"\['a'\] are not used by the final step"),
    ],
)  # fmt: skip
def test_bad_steps_and_parameters(
    family: dict[str, Path], tmp_path: Path, steps: list[dict[str, Any]], match: str
) -> None:
    expect_input_error(family, tmp_path, steps, match)


def test_unknown_method_is_rejected_at_config_load(family: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="arcee_fusion"):
        stage_for(
            family, tmp_path / "o", [{"name": "s", "method": "frankenmerge", "models": [{"model": "math"}]}]
        )


def test_committed_inputs_are_checked_against_their_manifest(family: dict[str, Path], tmp_path: Path) -> None:
    expect_input_error(family, tmp_path, TINYR1, r"model 'math' .*no _MANIFEST.json", exc=NotCommittedError,
                       committed_models=["math"])  # fmt: skip
    committed = tmp_path / "committed"
    LocalStorage().publish_dir(family["math"], str(committed), fingerprint="m")
    fam = {**family, "math": committed}
    run(stage_for(fam, tmp_path / "ok", TINYR1, committed_models=["math"]), ctx_for(tmp_path))
    with (committed / "model.safetensors").open("ab") as f:
        f.write(b"junk")
    expect_input_error(fam, tmp_path, TINYR1, r"model 'math' .*model.safetensors has \d+ bytes, the manifest says",
                       exc=ChecksumError)  # fmt: skip


def test_failure_mid_merge_leaves_nothing_visible(family: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    real = engine_mod.compute_tensor

    def flaky(plan, tp, *args):  # type: ignore[no-untyped-def]
        if tp.index == len(plan.tensors) - 2:
            raise RuntimeError("disk on fire")
        return real(plan, tp, *args)

    monkeypatch.setattr(engine_mod, "compute_tensor", flaky)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"tensor '.*': RuntimeError: disk on fire"):
        run(stage_for(family, out, TINYR1, shard_size_mb=1), ctx_for(tmp_path))
    assert_no_output(out)


def test_output_overlapping_an_input_is_refused(family: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(StageInputError, match="overlaps the input model 'math'"):
        run(stage_for(family, family["math"] / "merged", TINYR1), ctx_for(tmp_path))


# --------------------------------------------------------------------------- S3, CLI, memory


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_s3_inputs_and_output(family: dict[str, Path], tmp_path: Path, moto_endpoint: str,
                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    s3 = S3Storage(StorageConfig(endpoint=moto_endpoint))
    s3._client.create_bucket(Bucket="models")
    remote = {}
    for name in ("math", "science", "code"):
        s3.publish_dir(family[name], f"s3://models/{name}", fingerprint=name)
        remote[name] = f"s3://models/{name}"
    stage = stage_for(remote, "s3://models/merged", TINYR1, storage={"endpoint": moto_endpoint},
                      committed_models=["math", "science", "code"])  # fmt: skip
    result = run(stage, ctx_for(tmp_path, s3))
    assert result.status == "Succeeded"
    assert not list((tmp_path / "work").glob("merge-*"))  # staging removed
    fetched = tmp_path / "fetched"
    s3.fetch_dir("s3://models/merged", fetched, verify=True)
    local = tmp_path / "local"
    run(stage_for(family, local, TINYR1), ctx_for(tmp_path))
    a, b = tensors(fetched), tensors(local)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_cli_subprocess(family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = stage_for(family, out, TINYR1).dump()
    cfg["resultPath"] = str(tmp_path / "result.json")
    (tmp_path / "stage.json").write_text(json.dumps(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "branchmerge_trainer.cli", "merge", "--config", str(tmp_path / "stage.json")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "BRANCHMERGE_WORKDIR": str(tmp_path / "w")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BRANCHMERGE_PROGRESS" in proc.stdout
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "Succeeded" and result["metrics"]["tensors"] > 0
    assert (out / MANIFEST).exists()


MEMORY_PROBE = r"""
import json, sys, threading, time
from pathlib import Path
import torch
from branchmerge_trainer.merge.synthetic import qwen2_config, write_family
from branchmerge_trainer.merge.plan import build_plan
from branchmerge_trainer.merge.engine import execute
from branchmerge_trainer.stages import MergeStage

root, layers = Path(sys.argv[1]), int(sys.argv[2])
cfg = qwen2_config(hidden=256, intermediate=512, layers=layers, vocab=512, heads=4, kv_heads=2)
dirs = write_family(root, ["a", "b", "c"], cfg, base="base", extra_files={"tokenizer_config.json": b"{}"})
stage = MergeStage.model_validate({"kind": "Merge", "name": "m", "fingerprint": "f", "output": str(root / "o"),
    "models": {k: {"uri": str(v)} for k, v in dirs.items()}, "tokenizerSource": "a", "prefetchMb": 16,
    "steps": [{"name": "ab", "method": "arcee_fusion", "base": "a", "models": [{"model": "b"}]},
              {"name": "t", "method": "ties", "base": "base", "models": [{"model": "ab"}, {"model": "c"}]}]})
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
plan = build_plan(stage)
before, peak, done = rss(), [0], []
def watch():
    while not done:
        peak[0] = max(peak[0], rss()); time.sleep(0.002)
t = threading.Thread(target=watch); t.start()
stats = execute(plan, root / "o", budget_bytes=16 << 20)
done.append(1); t.join()
print(json.dumps({"delta": peak[0] - before, "read": stats.bytes_read, "tensors": stats.tensors}))
"""


def test_memory_does_not_grow_with_the_number_of_tensors(tmp_path: Path) -> None:
    """Peak RSS during a merge of 16 layers stays within a few MB of that for 2 layers,
    although 7x more bytes go through (~20 MB per model vs ~3 MB)."""

    def probe(layers: int) -> dict[str, int]:
        root = tmp_path / f"l{layers}"
        root.mkdir()
        proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(root), str(layers)], capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    small, large = probe(2), probe(16)
    assert large["read"] > 6 * small["read"]
    assert large["delta"] - small["delta"] < 16 * 2**20, (small, large)
    assert large["delta"] < 64 * 2**20 < large["read"]  # less than the inputs it streamed
