#!/usr/bin/env bash
# The 5B example on 2 nodes x 8 H100s as a SLURM job that checkpoints and requeues itself 5 minutes before each
# time limit, then continues with --resume auto (a preempted job comes back from its last periodic checkpoint).
# A rank that makes no step progress for 20 minutes dumps its stacks into the job log and exits; the job is then
# requeued (at most 3 times) and resumes from its last checkpoint. Ranks computing 1.5x slower than the median
# are named in the log every 10 steps.
#   bash examples/launch-slurm.sh DATA RUN_DIR [extra cogvx launch flags, e.g. --dry-run --account A]
# DATA: a latent cache (cogvx data encode); RUN_DIR: a folder on a filesystem every node sees.
# tests/unit/test_examples.py dry-runs this script.
set -euo pipefail
DATA="$1"; RUN_DIR="$2"; shift 2
COGVX="${COGVX:-cogvx}"
$COGVX launch slurm --nodes 2 --gpus-per-node 8 --partition "${PARTITION:-gpu}" --time 24:00:00 \
  --cpus-per-task 96 --signal-seconds 300 "$@" -- \
  --config examples/configs/cogvideox-5b-8xh100.yaml --data "$DATA" --run-dir "$RUN_DIR" \
  training.save_interval=500 training.async_save=true training.hang_timeout_s=1200 \
  training.straggler_factor=1.5 training.log_interval=10
