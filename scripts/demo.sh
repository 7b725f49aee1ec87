#!/usr/bin/env bash
# The whole stack on this machine, no GPU and no root: an edge-proxy, a node-agent and a real
# llama-server on a generated tiny model; the "GPU box" suspends after 20 s idle and wakes on the
# next request. Usage: scripts/demo.sh [--port 8080] [--idle-timeout-s 20] [--verbose] ...
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-venv.sh node
exec .venv/bin/python -m inference_node.demo "$@"
