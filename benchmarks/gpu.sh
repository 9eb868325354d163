#!/usr/bin/env bash
# The study's grid on a CUDA GPU, measured, in one device call (under 9 minutes on an H100/H200).
#
# Prepare here, once (the device machine reaches no registry and gets no ../shared):
#   python benchmarks/small_rooms.py          # .gpu/data/rooms: the Houses rooms task at 256 px, ~20 MB
#   bash benchmarks/gpu.sh --wheels           # .whl/: fastai & co and imagehash, which the image lacks
# Then one device call carrying both (see README, "On a GPU"):
#   run(command="bash benchmarks/gpu.sh", carry=[".gpu", ".whl"], timeout_s=600)
# Dry run on a CPU, on a tiny copy (python benchmarks/small_rooms.py --houses 20 --out .gpu/tiny):
#   DRY_RUN=1 PY=.venv/bin/python DATA=.gpu/tiny OUT=/tmp/gpu-dry bash benchmarks/gpu.sh
#
# It writes to $OUT (at most 8 files come back): steps.csv (seconds per step), gpu.log (all
# output), table.csv (the compare table), runs.csv (one row per run: images/s, peak GPU memory,
# accuracy), gpu_util.csv (nvidia-smi every second), profile.txt (benchmarks/profile_cell.py).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--wheels" ]; then  # here, not on the device: the packages the device image lacks
  PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  # fastai and its small pure-Python needs (no spacy: fastai's text module is not used), imagehash + PyWavelets.
  # fastprogress 1.1 needs python-fasthtml (a web framework and its dependencies); 1.0 does not.
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
    -d .whl fastai fastcore "fastprogress<1.1" fastdownload fasttransform plum-dispatch beartype imagehash pywavelets
  ls -la .whl
  exit 0
fi

DRY_RUN=${DRY_RUN:-0}
PY=${PY:-python3}
DATA=${DATA:-.gpu/data}
OUT=${OUT:-/tmp/gpu-out}
EXPORTS=${EXPORTS:-/tmp/gpu-exports}
mkdir -p "$OUT" "$EXPORTS"
if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu; EPOCHS=1; SIZE="--size 64"; ARCHS=resnet18,alexnet; CUDA_STEPS=0
else
  DEVICE=cuda; EPOCHS=30; SIZE=""; ARCHS=resnet18,alexnet,vgg11_bn,densenet121,inception_v3; CUDA_STEPS=1
fi
echo "step,seconds,status" > "$OUT/steps.csv"
exec > >(tee -a "$OUT/gpu.log") 2>&1

STEPS_CSV="$OUT/steps.csv"
source benchmarks/device_steps.sh
step install install_wheels
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
R="$PY -m replicate"

step environment bash -c "nvidia-smi -L 2>/dev/null || echo 'no nvidia-smi'; $PY -c 'import torch, fastai, timm; print(torch.__version__, fastai.__version__, timm.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())'"
step gpu-tests $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_train.py

if [ "$CUDA_STEPS" = 1 ]; then  # every CUDA branch once, short
  step cuda-fp32 $R run rooms --arch resnet18 --unfreeze --epochs 1 --no-pretrained --device cuda --data-dir "$DATA" --exports-dir "$EXPORTS/branches"
  step cuda-bf16 $R run rooms --arch resnet18 --unfreeze --epochs 1 --no-pretrained --device cuda --precision bf16 --data-dir "$DATA" --exports-dir "$EXPORTS/branches"
  step cuda-fp16 $R run rooms --arch resnet18 --unfreeze --epochs 1 --no-pretrained --device cuda --precision fp16 --data-dir "$DATA" --exports-dir "$EXPORTS/branches"
  step cuda-cached $R run rooms --arch densenet121 --epochs 2 --no-pretrained --device cuda --precision bf16 --cache-features 3 --data-dir "$DATA" --exports-dir "$EXPORTS/branches"
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 1000 > "$OUT/gpu_util.csv" 2>/dev/null &
  SMI=$!
fi

step profile bash -c "$PY benchmarks/profile_cell.py --data-dir '$DATA' --arch resnet18 --unfreeze --epochs 3 $SIZE --device $DEVICE \
  $([ "$CUDA_STEPS" = 1 ] && echo --precision bf16) --torch-profile --exports-dir '$EXPORTS/profile' > '$OUT/profile.txt'"

# The study's grid: 5 archs x frozen/unfrozen, 30 epochs at the study's sizes, frozen cells cached.
PRECISION=$([ "$CUDA_STEPS" = 1 ] && echo bf16 || echo fp32)
step grid $R compare rooms --archs "$ARCHS" --epochs "$EPOCHS" $SIZE --no-pretrained --device "$DEVICE" \
  --precision "$PRECISION" --cache-features 3 --data-dir "$DATA" --exports-dir "$EXPORTS"
if [ "$CUDA_STEPS" = 1 ]; then  # fp32 beside bf16, for accuracy and speed
  step grid-fp32 $R compare rooms --archs resnet18,densenet121 --epochs "$EPOCHS" --no-pretrained --device cuda \
    --cache-features 3 --data-dir "$DATA" --exports-dir "$EXPORTS"
  kill "$SMI" 2>/dev/null
fi

cp "$EXPORTS/rooms/compare/table.csv" "$OUT/table.csv" 2>/dev/null
$PY - "$EXPORTS/rooms" "$OUT/runs.csv" <<'PYTHON'
import json, sys
from pathlib import Path
import pandas as pd
rows = []
for run in sorted(Path(sys.argv[1]).iterdir()):
    try:
        config, metrics = (json.loads((run / f).read_text()) for f in ("config.json", "metrics.json"))
    except OSError:
        continue
    rows.append({"run": run.name, "device": config["device_used"], "precision": config["precision"],
                 "epochs": config["epochs"], "size": config["size"], "train_s": round(metrics["train_seconds"], 1),
                 "images_per_s": round(metrics["train_images_per_second"], 1),
                 "peak_gpu_mib": metrics.get("peak_gpu_memory_mib"),
                 "best_acc": metrics["best_valid_accuracy"], "last_acc": metrics["last_valid_accuracy"]})
pd.DataFrame(rows).to_csv(sys.argv[2], index=False)
print(pd.DataFrame(rows).to_string(index=False))
PYTHON
echo "=== steps"; cat "$OUT/steps.csv"
