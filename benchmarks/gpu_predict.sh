#!/usr/bin/env bash
# Serving checks on a CUDA GPU, in one device call (about 6 minutes on an H100/H200):
#  - trains resnet18 and densenet121 at 224 px on the Houses rooms photos (from scratch: no weights
#    can be downloaded there), fastai recipe, 20 epochs, so the int8 accuracy is measured on real models;
#  - `replicate export --quantize int8` on both (ONNX Runtime's static int8, on the CPU there);
#  - `replicate predict` with --device cuda and auto (ONNX Runtime's CUDA provider if installed, else
#    PyTorch) and on the CPU with ONNX Runtime, and whether the engines agree;
#  - pytest -m gpu.
#
# Prepare here, once (the device machine reaches no registry and gets no ../shared):
#   python benchmarks/small_rooms.py          # .gpu/data/rooms: the Houses rooms task at 256 px, ~20 MB
#   bash benchmarks/gpu.sh --wheels           # .whl/: fastai & co and imagehash, which the image lacks
# Then: run(command="bash benchmarks/gpu_predict.sh", carry=[".gpu", ".whl"], timeout_s=560)
#
# Back in $OUT (at most 8 files of 16 MiB): results.tar.gz (logs, both runs' config/metrics/history,
# the tag tables, the agreement), the two model.int8.onnx files, densenet121's model.onnx in two parts
# (to measure int8 against fp32 on the 2-core machine too: benchmarks/predict_bench.py --runs).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu-out}
DATA=${DATA:-.gpu/data}
EX=${EX:-/tmp/gpu-predict}
EPOCHS=${EPOCHS:-20}
DEVICE=${DEVICE:-cuda}   # dry run here: DEVICE=cpu EPOCHS=1 SIZE=64 PY=.venv/bin/python DATA=.gpu/tiny bash benchmarks/gpu_predict.sh
SIZE=${SIZE:-224}
PRECISION=$([ "$DEVICE" = cuda ] && echo bf16 || echo fp32)
mkdir -p "$OUT" "$EX"
exec > >(tee -a "$EX/gpu_predict.log") 2>&1
echo "step,seconds,status" > "$EX/steps.csv"

STEPS_CSV="$EX/steps.csv"
source benchmarks/device_steps.sh
step install install_wheels
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
R="$PY -m replicate"

step environment bash -c "nvidia-smi -L; $PY -c 'import torch, onnxruntime as o; print(torch.__version__, torch.cuda.get_device_name(), o.__version__, o.get_available_providers())'; nproc"
for arch in resnet18 densenet121; do
  step "train-$arch" timeout 200 $R run rooms --arch $arch --no-pretrained --unfreeze --recipe fastai --size "$SIZE" \
    --epochs "$EPOCHS" --workers 8 --device "$DEVICE" --precision "$PRECISION" --data-dir "$DATA" --exports-dir "$EX/exports"
done
RUNS=$(ls -d "$EX"/exports/rooms/*-unfrozen-fastai* 2>/dev/null)
step int8 $R export $RUNS --quantize int8
step predict-cuda $R predict $RUNS "$DATA/rooms/valid" --device "$DEVICE" --out "$EX/tags_cuda.csv"
step predict-auto $R predict $RUNS "$DATA/rooms/valid" --out "$EX/tags_auto.csv"
step predict-onnx-cpu $R predict $RUNS "$DATA/rooms/valid" --device cpu --out "$EX/tags_onnx_cpu.csv"
step agreement $PY - "$EX" <<'EOF'
import json, sys
from pathlib import Path
import pandas as pd
ex = Path(sys.argv[1])
cuda, cpu = pd.read_csv(ex / "tags_cuda.csv"), pd.read_csv(ex / "tags_onnx_cpu.csv")
out = {}
for col in [c for c in cpu.columns if c.endswith("_predicted")]:
    p = cpu.filter(like=col.replace("_predicted", "_p_")).to_numpy() - cuda.filter(like=col.replace("_predicted", "_p_")).to_numpy()
    out[col] = {"same_class": float((cuda[col] == cpu[col]).mean()), "max_abs_prob_diff": float(abs(p).max()),
                "accuracy": float((cpu[col] == cpu.path.map(lambda s: Path(s).parent.name)).mean())}
print(json.dumps(out, indent=1))
(ex / "agreement.json").write_text(json.dumps(out, indent=1))
EOF
step gpu-tests $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_train.py tests/test_export.py

cd "$EX"
for run in $RUNS; do
  arch=$(basename "$run" | cut -d- -f1)
  mkdir -p "runs/$arch" && cp "$run"/{config.json,metrics.json,history.csv} "runs/$arch/"
  cp "$run/model.int8.onnx" "$OUT/$arch.int8.onnx"
done
densenet=$(ls -d exports/rooms/densenet121-* | head -1)
[ -n "$densenet" ] && split -b 15M -d "$densenet/model.onnx" "$OUT/densenet121.onnx.part"
tar czf "$OUT/results.tar.gz" gpu_predict.log steps.csv runs tags_*.csv agreement.json 2>/dev/null
ls -la "$OUT"
