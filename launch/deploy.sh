#!/usr/bin/env bash
# Thin wrapper: the Flower environment of DESIGN.md §6, then launch/deploy.py
# (PYTHON=... picks the interpreter; default: the project's .venv).
#   launch/deploy.sh demo
#   launch/deploy.sh run experiment=synthetic_deploy_demo federation.rounds=5
#   launch/deploy.sh --help                     # usage and examples
#   launch/deploy.sh run --run-dir outputs/deploy/<name>/<run> --resume experiment=...
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_HOME="${FLWR_HOME:-$ROOT/.flwr}" TMPDIR="${TMPDIR:-$ROOT/.tmp}"
export RAY_TMPDIR="${RAY_TMPDIR:-$ROOT/.tmp}" MPLBACKEND=Agg
mkdir -p "$FLWR_HOME" "$TMPDIR"
cd "$ROOT"
exec "${PYTHON:-$ROOT/.venv/bin/python}" -m launch.deploy "$@"
