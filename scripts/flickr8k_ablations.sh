#!/usr/bin/env bash
# Short Flickr8k runs of configs/flickr8k_attention.yaml at 224 px, a peak rate of 1e-3 and best.pt chosen on CIDEr
# (the settings these variants were measured at) that each change one thing, scored on the dev split.
#
#   bash scripts/flickr8k_ablations.sh                        # every variant, data in data/flickr8k
#   bash scripts/flickr8k_ablations.sh baseline dropout_0.2   # some of them
#   EPOCHS=4 FLICKR8K=/data/flickr8k IMAGES=/data/flickr8k/images WEIGHTS=mobilenet_v2.pth CACHE=runs/features/f8k \
#       bash scripts/flickr8k_ablations.sh
#
# Each variant trains EPOCHS epochs of cross-entropy (default 2, the cosine schedule shortened to match; no
# self-critical epochs) from the shared feature cache into runs/ablations/<variant>/; the last lines print each
# variant's dev BLEU-4 and CIDEr at its best-CIDEr epoch (greedy decoding, as in the per-epoch validation).
# finetune_top trains MobileNetV2's last two stages, so it runs the encoder in the loop on the JPEGs (no cache) and is
# several times slower than the others.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
EPOCHS=${EPOCHS:-2}
FLICKR8K=${FLICKR8K:-data/flickr8k}
WEIGHTS=${WEIGHTS:-IMAGENET1K_V1}
IMAGES=${IMAGES:-$FLICKR8K/Flicker8k_Dataset}
CACHE=${CACHE:-runs/features/flickr8k_mobilenet_v2}

declare -A VARIANTS=(
  [baseline]=""
  [dropout_0.2]="model.dropout=0.2"
  [embed_512]="model.embed_dim=512"
  [hidden_1024]="model.hidden_dim=1024"
  [label_smoothing_0.1]="train.label_smoothing=0.1"
  [scheduled_sampling_0.25]="train.scheduled_sampling=0.25"
  [lr_constant]="train.lr_schedule=constant"
  [lr_2e-3]="train.lr=2e-3"
  [lr_4e-3]="train.lr=4e-3"
  [captions_1]="data.captions_per_image=1"
  [finetune_top]="data.feature_cache= data.augment=false data.num_workers=1 model.trainable_layers=2"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(baseline dropout_0.2 embed_512 hidden_1024 label_smoothing_0.1
                                  scheduled_sampling_0.25 lr_constant lr_2e-3 lr_4e-3 captions_1 finetune_top)

for name in "${names[@]}"; do
  [ -v "VARIANTS[$name]" ] || { echo "unknown variant '$name'; known: ${!VARIANTS[*]}" >&2; exit 2; }
  out=runs/ablations/$name
  [ -f "$out/metrics.jsonl" ] && [ "$(wc -l < "$out/metrics.jsonl")" -ge "$EPOCHS" ] && continue  # done before
  start=(--config configs/flickr8k_attention.yaml)
  [ -f "$out/last.pt" ] && start=(--resume "$out/last.pt")  # a stopped variant goes on with its saved config
  # shellcheck disable=SC2086  # the variant's overrides are separate words
  "$PY" scripts/train.py "${start[@]}" --set \
    data.root="$FLICKR8K" data.image_dir="$IMAGES" model.encoder_weights="$WEIGHTS" data.feature_cache="$CACHE" \
    data.num_workers=0 data.image_size=224 train.lr=1e-3 \
    train.epochs="$EPOCHS" train.scst_epochs=0 train.average_epochs=0 train.select_metric=CIDEr \
    train.out_dir="$out" ${VARIANTS[$name]}
done

"$PY" - "${names[@]}" <<'EOF'
import json, sys
for name in sys.argv[1:]:
    rows = [json.loads(line)["val"] for line in open(f"runs/ablations/{name}/metrics.jsonl")]
    best = max(rows, key=lambda v: v["CIDEr"])  # as the runs select checkpoints
    print(f"{name:<26} dev BLEU-4 {best['Bleu_4']:.4f}  CIDEr {best['CIDEr']:.4f}  ({len(rows)} epochs)")
EOF
