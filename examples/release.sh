#!/usr/bin/env bash
# From a trained checkpoint to a video and a diffusers release.
#   bash examples/release.sh CKPT VAE T5 OUT_DIR [PROMPT]
# CKPT: a cogvx-mega checkpoint (e.g. runs/x/checkpoints/step_00001000, any training layout) or a diffusers
# transformer folder; VAE: a diffusers AutoencoderKLCogVideoX folder; T5: a local T5 folder (tokenizer and
# encoder). Writes OUT_DIR/sample.mp4 (+ .gif, + final latents) and OUT_DIR/release, a CogVideoXPipeline folder.
# Extra cogvx sample flags go in SAMPLE_FLAGS (e.g. "--frames 49 --size 480x720"). tests/unit/test_export.py runs
# this script on a tiny model.
set -euo pipefail
CKPT="$1"; VAE="$2"; T5="$3"; OUT="$4"; PROMPT="${5:-a red square moving left}"
COGVX="${COGVX:-cogvx}"
mkdir -p "$OUT"
# shellcheck disable=SC2086
$COGVX sample --ckpt "$CKPT" --vae "$VAE" --text-encoder "$T5" --prompt "$PROMPT" --scheduler dpm --steps 50 \
  --guidance 6 --seed 42 --output "$OUT/sample.mp4" --gif --save-latents "$OUT/sample-latents.safetensors" \
  ${SAMPLE_FLAGS:-}
$COGVX export diffusers --ckpt "$CKPT" --vae "$VAE" --text-encoder "$T5" --out "$OUT/release"
