#!/usr/bin/env bash
# The one device command: the GPU suite in two plans that fit the device budget (benchmarks/gpu_suite.py says what
# each plan runs and holds the step limits).
#
#   bash benchmarks/gpu_suite.sh --budget              # each step's limit and each plan's total; runs nothing
#   bash benchmarks/gpu_suite.sh --plan a --rehearse   # every Plan A step on this CPU at tiny shapes (CI runs it)
#
# Staging here, once:  bash ../shared/device/stage-gpu-deps.sh --no-te diffusers==0.42.1     (Plan A: no chunk calls)
#                      bash ../shared/device/stage-gpu-deps.sh diffusers==0.42.1             (Plan B: 5 chunk calls)
# On the device:       bash .gpu/install.sh && bash benchmarks/gpu_suite.sh --plan a
#                      (Plan B: the chunk calls first, then the same with --plan b)
#
# Writes under $OUT: gpu_suite.json, gpu_suite.md and each step's log, after every step. Exit status: the number of
# failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" benchmarks/gpu_suite.py "$@"
