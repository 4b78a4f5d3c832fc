#!/usr/bin/env bash
# The whole test suite: unit tests, then integration/e2e tests against the real control
# plane and S3 server, which the test fixtures start on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f tests/cluster/build.sh ]; then
  bash tests/cluster/build.sh
fi
# pytest exits 5 when it collected nothing: that is a failure here, not a pass.
.venv/bin/python -m pytest "$@"
