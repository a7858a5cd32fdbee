#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the demo: catalog, model, think-ahead snapshot and the
# service answering real REST and gRPC requests. Extra arguments go to `thinkahead demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec thinkahead demo "$@"
