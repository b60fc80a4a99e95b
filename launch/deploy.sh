#!/usr/bin/env bash
# Thin wrapper around `python -m cnfgnn.deploy` (cnfgnn/deploy/launcher.py), which gives every
# process it starts the Flower environment (cnfgnn.config.flower_environment). PYTHON=...
# picks the interpreter (default: the project's .venv).
#   launch/deploy.sh demo
#   launch/deploy.sh run experiment=synthetic_deploy_demo federation.rounds=5
#   launch/deploy.sh --help                     # usage and examples
#   launch/deploy.sh run --run-dir outputs/deploy/<name>/<run> --resume experiment=...
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
exec "${PYTHON:-$ROOT/.venv/bin/python}" -m cnfgnn.deploy "$@"
