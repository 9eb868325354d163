# Sourced by gpu.sh and gpu_predict.sh: timed steps and the wheel install for a device machine.
# Needs PY (the python to use) and STEPS_CSV (where each step's seconds and exit status go).

step() {  # step NAME COMMAND...: run, time, record; a failing step is recorded and the script goes on
  local name=$1; shift
  echo "=== $name: $*"
  local t0 t1 status seconds
  t0=$(date +%s%N)
  "$@"
  status=$?
  t1=$(date +%s%N)
  seconds=$(awk "BEGIN { printf \"%.1f\", ($t1 - $t0) / 1e9 }")
  echo "$name,$seconds,$status" >> "$STEPS_CSV"
  echo "=== $name: exit $status, $seconds s"
}

install_wheels() {  # the carried .whl/ (gpu.sh --wheels), where the image lacks fastai or imagehash
  if $PY -c "import fastai, imagehash" 2>/dev/null; then echo "fastai and imagehash already there"; return 0; fi
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}
