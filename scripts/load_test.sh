#!/usr/bin/env bash
# Headless locust run against a local service for a bounded time; CSVs land in OUT.
#   scripts/load_test.sh HTTP_PORT GRPC_PORT OUT [SECONDS] [USERS] [USER_IDS_FILE] [ITEM_IDS_FILE]
# THINKAHEAD_LOAD_SAMPLES / THINKAHEAD_LOAD_STATS in the environment: files the locustfile writes
# at exit (every recommend's latency; the request stats once every user has stopped).
set -euo pipefail
cd "$(dirname "$0")/.."
http_port=$1 grpc_port=$2 out=$3 seconds=${4:-30} users=${5:-16}
mkdir -p "$out"
# shellcheck disable=SC1091
. .venv/bin/activate
export THINKAHEAD_GRPC="127.0.0.1:$grpc_port"
[ -n "${6:-}" ] && export THINKAHEAD_LOAD_USERS="$6"
[ -n "${7:-}" ] && export THINKAHEAD_LOAD_ITEMS="$7"
exec locust -f tests/load/locustfile.py --headless --only-summary \
  -u "$users" -r "$users" -t "${seconds}s" --host "http://127.0.0.1:$http_port" \
  --csv "$out/locust" --exit-code-on-error 0
