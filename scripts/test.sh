#!/usr/bin/env bash
# Set up the environment (with test tools) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/python -m pytest -q "$@"
