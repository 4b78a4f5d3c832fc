"""Each Dockerfile's install steps, run for real in a fresh virtual environment.

No container builder exists here, so this is how a broken image install is caught before CI
builds the images: the build stage's COPY steps are replayed into a temporary build context
(through .dockerignore), and its `python -m venv` / `pip` steps run with the image paths
mapped onto temporary directories. Steps marked `# needs: cuda` (DeepSpeed's op build,
vLLM) are skipped; everything else runs as written, except that torch comes from the CPU
wheel of the same version the test suite uses instead of PyTorch's CUDA index, and pip's
download cache is kept between runs (under ~/.cache/branchmerge) and nothing is
byte-compiled, to bound the time (about 2 minutes for both images on 2 shared cores).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_dockerfiles import (
    OPERATOR,
    TRAINER,
    Dockerfile,
    Stage,
    copy_sources,
    dockerignored,
    parse_dockerfile,
    run_commands,
    stage_args,
    substitute,
)

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("BRANCHMERGE_CACHE", Path.home() / ".cache" / "branchmerge"))
STEP_TIMEOUT = 480

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _copy_context(src: str, dest: Path) -> None:
    """Copy one COPY source from the repository into the fake image, skipping ignored paths."""
    root = REPO / src
    if root.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root, dest)
        return
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(REPO).as_posix()
        if path.is_file() and not dockerignored(rel):
            target = dest / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def replay_build_stage(df: Dockerfile, stage: Stage, root: Path) -> Path:
    """Run the stage's COPY, venv and pip steps under `root`; return the venv directory."""
    venv = root / "opt" / "venv"
    args = stage_args(df, stage)
    workdir = root
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    cache = CACHE / "pip-image-installs"
    ran: list[str] = []

    def image_path(p: str) -> Path:
        return root / p.lstrip("/") if p.startswith("/") else workdir / p

    for ins in stage.instructions:
        if ins.keyword == "WORKDIR":
            workdir = image_path(ins.args)
            workdir.mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            sources = copy_sources(ins)
            dest = shlex.split(ins.args)[-1]
            for src in sources:
                target = image_path(dest)
                if dest.endswith("/") and (REPO / src).is_file():
                    target = target / Path(src).name
                elif dest in {".", "./"}:
                    target = workdir / Path(src).name
                _copy_context(src, target)
        elif ins.keyword == "RUN":
            if any(c.startswith("needs: cuda") for c in ins.comments):
                continue
            for cmd in run_commands(ins):
                words = shlex.split(substitute(cmd, args))
                if re.fullmatch(r"python[\d.]*", words[0]) and words[1:3] == ["-m", "venv"]:
                    words = [sys.executable, "-m", "venv", str(image_path(words[3]))]
                elif words[0] == "pip" or words[0].endswith("/bin/pip"):
                    words[0] = str(venv / "bin" / "pip")
                    if "--index-url" in words:  # PyPI's CPU wheel of the same torch, from local disk
                        i = words.index("--index-url")
                        del words[i : i + 2]
                    words = [f"--cache-dir={cache}" if w == "--no-cache-dir" else w for w in words]
                    if words[1] == "install":  # byte-compiling torch costs a minute and proves nothing here
                        words.insert(2, "--no-compile")
                    words = [str(image_path(w.split("[")[0])) + w[len(w.split("[")[0]) :] if w.startswith("/src") else w
                             for w in words]  # fmt: skip
                else:
                    continue  # apt-get, useradd …: the image's OS, not the Python install
                res = subprocess.run(
                    words, cwd=workdir, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT
                )
                assert res.returncode == 0, (
                    f"{df.path}:{ins.line}: {shlex.join(words)}\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
                )
                ran.append(" ".join(words[:4]))
    assert any("venv" in r for r in ran) and any("pip" in r for r in ran), ran
    return venv


def _run(venv: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd="/")


def test_operator_image_installs_the_control_plane_without_torch(tmp_path: Path) -> None:
    df = parse_dockerfile(OPERATOR)
    venv = replay_build_stage(df, df.stage("build"), tmp_path)
    res = _run(venv, "branchmerge", "--help")
    assert res.returncode == 0, res.stderr
    res = _run(venv, "python", "-c", "import kopf, kubernetes, prometheus_client, branchmerge_operator")
    assert res.returncode == 0, res.stderr
    res = _run(venv, "python", "-c", "import torch")
    assert res.returncode != 0 and "No module named 'torch'" in res.stderr, (
        "torch leaked into the operator image"
    )
    # Installed from the copied context, not linked to this checkout.
    res = _run(venv, "python", "-c", "import branchmerge_operator as m; print(m.__file__)")
    assert str(venv) in res.stdout, res.stdout


def test_trainer_image_installs_the_workloads(tmp_path: Path) -> None:
    df = parse_dockerfile(TRAINER)
    venv = replay_build_stage(df, df.stage("build"), tmp_path)
    version = stage_args(df, df.stage("build"))["TORCH_VERSION"]
    probe = (
        "import torch, transformers, accelerate, safetensors, boto3, pyarrow, branchmerge_trainer; "
        "print(torch.__version__)"
    )
    res = _run(venv, "python", "-c", probe)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().split("+")[0] == version
    res = _run(venv, "branchmerge-train", "--help")
    assert res.returncode == 0 and "sft" in res.stdout, res.stderr
