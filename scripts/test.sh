#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite: real redis-server processes, real
# vLLM on CPU, real HTTP and gRPC over loopback. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q "$@"
