"""`branchmerge validate | crds | plan`, run in-process (and once as the installed script)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from branchmerge_operator import cli
from branchmerge_operator.crds import crds, render

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(str(p) for p in (ROOT / "examples").glob("*.yaml"))
MALFORMED = sorted(str(p) for p in (ROOT / "tests/unit/malformed").glob("*.yaml"))


def test_validate_examples_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", *EXAMPLES]) == 0
    out = capsys.readouterr().out
    assert "Distillation/tinyr1-32b: valid" in out and "Distillation/tiny-cpu: valid" in out


def test_validate_malformed_fails_with_readable_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", *MALFORMED]) == 1
    err = capsys.readouterr().err
    assert err.count("problem(s)") == len(MALFORMED)
    assert "spec.branches[1].name: duplicate branch name 'math' (fix: give every branch a unique name)" in err
    assert "spec.output.secretAccessKey: credentials are not allowed in the spec" in err


def test_validate_skips_objects_of_other_api_groups(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "bundle.yaml"
    secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: s3}\nstringData: {AWS_ACCESS_KEY_ID: x}\n"
    bundle.write_text(secret + "---\n" + (ROOT / "examples/tiny-cpu.yaml").read_text())
    assert cli.main(["validate", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "Secret/s3: skipped (not a branchmerge.io resource)" in out and "Distillation/tiny-cpu: valid" in out
    assert cli.main(["plan", str(bundle)]) == 0
    assert capsys.readouterr().out.startswith("Distillation/tiny-cpu\n")


def test_validate_mixed_files_and_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: [unclosed\n")
    assert cli.main(["validate", EXAMPLES[0], str(broken), str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert "broken.yaml: cannot read" in err and "missing.yaml: cannot read" in err


def test_plan_prints_stages_fingerprints_and_uris(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", str(ROOT / "examples/tinyr1-32b.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Distillation/tinyr1-32b"
    kinds = [line.split()[0] for line in out[1:]]
    assert kinds == ["SFT", "SFT", "SFT", "Merge", "Eval"]
    assert "s3://branchmerge/tinyr1-32b/branches/math/" in out[1]
    assert out[4].split()[3].startswith("s3://branchmerge/tinyr1-32b/merge/")


def test_plan_json_is_the_stage_contract(capsys: pytest.CaptureFixture[str]) -> None:
    from branchmerge_trainer.stages import parse_stage

    assert cli.main(["plan", "--json", str(ROOT / "examples/tiny-cpu.yaml")]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    stages = [parse_stage(s) for s in entry["stages"]]
    assert [s.kind for s in stages] == ["SFT", "SFT", "SFT", "Merge", "Eval"]
    assert all(s.output.startswith("file:///tmp/branchmerge-demo/runs/tiny-cpu/") for s in stages)


def test_plan_invalid_manifest(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", MALFORMED[0]]) == 1
    assert "unknown field" in capsys.readouterr().err


def test_crds_write_check_and_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["crds", "--out", str(tmp_path)]) == 0
    for name, obj in crds().items():
        assert (tmp_path / name).read_text() == render(obj)
    assert cli.main(["crds", "--check", "--out", str(tmp_path)]) == 0
    (tmp_path / next(iter(crds()))).write_text("stale")
    assert cli.main(["crds", "--check", "--out", str(tmp_path)]) == 1
    capsys.readouterr()
    assert cli.main(["crds", "--stdout"]) == 0
    assert capsys.readouterr().out.count("kind: CustomResourceDefinition") == 2


def test_adding_a_subcommand_is_one_function(capsys: pytest.CaptureFixture[str]) -> None:
    def configure(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name", default="world")

    @cli.command("hello-test", "say hello", configure)
    def hello(args: argparse.Namespace) -> int:
        print(f"hello {args.name}")
        return 0

    try:
        assert cli.main(["hello-test", "--name", "you"]) == 0
        assert capsys.readouterr().out == "hello you\n"
    finally:
        cli.COMMANDS.pop("hello-test")


def test_installed_console_script() -> None:
    exe = shutil.which("branchmerge", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("console script not installed (pip install -e .)")
    done = subprocess.run([exe, "validate", *EXAMPLES], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("module", ["branchmerge_operator", "branchmerge_operator.cli"])
def test_python_dash_m_has_every_command(module: str) -> None:
    """`python -m` must offer the same commands as the console script (run, demo, operator…)."""
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True).stdout
    for name in ("validate", "plan", "run", "status", "demo", "operator"):
        assert f"    {name} " in out, (name, out)
