#!/usr/bin/env bash
# Create .venv with the project installed (editable). `--dev` adds the test tools and the browser for the demo test.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
.venv/bin/python -m pip install -q --upgrade pip
# torch and torchvision are ranges: pip resolves a matching pair (each torchvision release pins its torch).
.venv/bin/python -m pip install -q -r requirements.txt -e ".$extras"
.venv/bin/python -c "import torch, torchvision; print(f'torch {torch.__version__}, torchvision {torchvision.__version__}')"
if [ "${1:-}" = "--dev" ] && ! command -v chromium >/dev/null; then
  # The demo's browser test drives Debian's Chromium through Playwright (Playwright's own browser download
  # needs internet access that CI does not have).
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: install Chromium (e.g. 'sudo apt-get install chromium') to run the demo's browser test" >&2
  fi
fi
