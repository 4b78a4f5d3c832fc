#!/usr/bin/env bash
# Create .venv with everything the tests and the quick start need (idempotent).
# torch is pinned to the CPU build that pip finds on this kind of machine's local disk;
# on a GPU machine install the trainer image instead (trainer_image/Dockerfile).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.branchmerge-setup
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/pip install -q -e ".[operator,trainer,dev]"
echo "$want" > "$stamp"
