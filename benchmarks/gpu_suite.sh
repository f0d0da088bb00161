#!/usr/bin/env bash
# The one device command: every check and benchmark that needs the GPU, in one run of about 8 minutes on an
# H200 after staging (../shared/device/README.md). Each step has its own time limit, so one that hangs costs its
# limit, not the run.
#
# Here (staging, once):  bash ../shared/device/stage-gpu-deps.sh diffusers==0.42.1
# Device: one call per chunk folder .gpu-cN (mkdir -p /tmp/gpu-chunks && cp .gpu-cN/* /tmp/gpu-chunks/), then
#   bash .gpu/install.sh && bash benchmarks/gpu_suite.sh
#
# Writes under $OUT: gpu_suite.json (per step: command, exit status, seconds, output tail), gpu_suite.md (the
# same as a table, then every step's output) and each step's full log. Exit status: the number of failed steps.
set -uo pipefail

OUT="${OUT:-/tmp/gpu-suite}"
mkdir -p "$OUT"
SITE=/tmp/cogvx-site
export PYTHONPATH="$SITE:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
PY=python3

# this project, built from the working tree (kernels/ and data/ map into cogvx_mega as in setup.py)
$PY -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" . >"$OUT/install.log" 2>&1 \
  || { echo "install failed:"; tail -20 "$OUT/install.log"; exit 100; }

STEPS=()
run() {  # run NAME LIMIT_S COMMAND...
  local name="$1" limit="$2"
  shift 2
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local status=$?
  local seconds=$((SECONDS - started))
  STEPS+=("$name|$status|$seconds|$*")
  echo "[$name] exit $status in $seconds s"
}

$PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(), flush=True)' >"$OUT/device.log" 2>&1
cat "$OUT/device.log"

# correctness first: the GPU test tier (kernels on real shapes, TE vs local, packed thd, FP8 vs bf16)
run tests 240 $PY -m pytest tests/gpu -q -p no:cacheprovider
# kernels against their references and the copy bandwidth
run bench-rope 60 $PY benchmarks/rope.py --device cuda
run bench-adaln 60 $PY benchmarks/adaln.py --device cuda
run bench-causal-pad 60 $PY benchmarks/causal_pad.py --device cuda
run bench-packing 90 $PY benchmarks/packing.py --device cuda --spatial-divisor 1 --text-length 226 --heads 48 \
  --head-dim 64 --layers 2 --clips 24 --kernel per_clip
# training steps at CogVideoX-5B width, 17,776 tokens, batch 1: bf16 beside diffusers, TE bf16, TE FP8
FIVE_B=(--preset cogvideox-5b --device cuda --micro-batch 1 --steps 5 --warmup 2 model.num_layers=4)
run step-bf16-vs-diffusers 120 $PY benchmarks/train_step.py "${FIVE_B[@]}" --compare-diffusers
run step-te-bf16 90 $PY benchmarks/train_step.py "${FIVE_B[@]}" model.backend=te
run step-te-fp8 90 $PY benchmarks/train_step.py "${FIVE_B[@]}" model.backend=te model.fp8=hybrid
# the job as a user runs it: torchrun, NCCL, one GPU, a few steps with a checkpoint
run torchrun-train 90 $PY -m torch.distributed.run --standalone --nproc-per-node 1 -m cogvx_mega.cli train \
  --preset tiny --device cuda --steps 4 --run-dir "$OUT/run" training.save_interval=2

failed=0
$PY - "$OUT" "${STEPS[@]}" <<'EOF'
import json, sys
out, steps = sys.argv[1], sys.argv[2:]
rows = []
for step in steps:
    name, status, seconds, command = step.split("|", 3)
    with open(f"{out}/{name}.log", errors="replace") as f:
        tail = f.read()[-6000:]
    rows.append({"step": name, "exit": int(status), "seconds": round(float(seconds), 1), "command": command,
                 "output_tail": tail})
with open(f"{out}/gpu_suite.json", "w") as f:
    json.dump({"device": open(f"{out}/device.log").read().strip(), "steps": rows}, f, indent=1)
with open(f"{out}/gpu_suite.md", "w") as f:
    f.write("| step | exit | s | command |\n|---|---|---|---|\n")
    for r in rows:
        f.write(f"| {r['step']} | {r['exit']} | {r['seconds']} | `{r['command']}` |\n")
    for r in rows:
        f.write(f"\n## {r['step']}\n\n```\n{r['output_tail']}\n```\n")
EOF
for step in "${STEPS[@]}"; do
  status=$(echo "$step" | cut -d'|' -f2)
  [ "$status" = "0" ] || failed=$((failed + 1))
done
echo "$failed step(s) failed; $OUT/gpu_suite.md"
exit $failed
