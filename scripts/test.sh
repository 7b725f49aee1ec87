#!/usr/bin/env bash
# Install llamanap with its test extras and a real llama-server, then lint, type-check and test.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-venv.sh node,test

# The sleep/wake end-to-end test builds network namespaces and makes the "GPU box" unreachable
# with nftables: it needs root and the nft tool (Debian package nftables).
if [ "$(id -u)" = 0 ] && ! command -v nft >/dev/null; then
    apt-get install -y -q nftables >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q nftables >/dev/null; } \
        || echo "warning: could not install nftables; the end-to-end test will fail" >&2
fi

# The dashboard tests load the pages in a real headless browser (Debian package chromium).
if [ "$(id -u)" = 0 ] && ! command -v chromium >/dev/null; then
    apt-get install -y -q chromium >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null; } \
        || echo "warning: could not install chromium; the dashboard tests will fail" >&2
fi

echo "== ruff"
.venv/bin/ruff check .
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
