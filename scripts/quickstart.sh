#!/usr/bin/env bash
# Quick start: set up the environment, train a captioner on the embedded synthetic shapes dataset (CPU, a few
# minutes), score it on held-out images, and caption a folder of them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
run=runs/quickstart/$(date +%Y%m%d-%H%M%S)
.venv/bin/python scripts/train.py --config configs/quickstart.yaml --set train.out_dir="$run"
.venv/bin/python scripts/evaluate.py --checkpoint "$run/best.pt" --split test --beam-size 3
.venv/bin/python -c "from captioning.data.synthetic import SyntheticShapes; SyntheticShapes('test', 250).write_images('$run/examples', 6)"
.venv/bin/python scripts/caption.py --checkpoint "$run/best.pt" "$run/examples" --out "$run/examples.jsonl"
cat "$run/examples.jsonl"
echo "quick start done: checkpoint $run/best.pt (try it in the demo: .venv/bin/python demo/app.py)"
