#!/usr/bin/env bash
# Retrain the whole miniature world from scratch, in order: scene pools -> VAE -> text encoder + UNet ->
# evaluators (whose camera is the new VAE) -> concept LoRAs. The shipped base, evaluators and concepts are
# trained together: a new base needs new evaluators and new LoRAs.
#
#   scripts/retrain_world.sh --device cuda --workers 16            # one GPU + 16 cores: about 9 minutes
#   scripts/retrain_world.sh --pack DIR ...                       # also copy the results to DIR as it goes
#
# Everything else is set by the variables below (override them in the environment, e.g. BASE_MINUTES=5).
# On a CPU-only machine use the staged commands of scripts/README.md instead (hours on 2 cores): the pooled
# data and large batches here are sized for a GPU.
#
# The previous assets are moved to runs/world-new/previous/ (never deleted), the new ones written in place:
# src/loraclr/world/assets/{mini-sd,evaluators,concepts}. Logs and sample grids: runs/world-new/.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cpu
WORKERS=2
PACK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --workers) WORKERS="$2"; shift 2 ;;
    --pack) PACK="$2"; shift 2 ;;
    *) echo "retrain_world.sh: unknown argument $1 (use --device, --workers, --pack)" >&2; exit 2 ;;
  esac
done

SEED=${SEED:-0}
SIZE=${SIZE:-mini}                   # tiny: a smoke test of this script (in a copy of the repo)
VAE_POOL=${VAE_POOL:-50000}          # pre-rendered scenes the VAE draws its batches from
VAE_STEPS=${VAE_STEPS:-3000}
VAE_BATCH=${VAE_BATCH:-128}
BASE_POOL=${BASE_POOL:-300000}       # base-training scenes (rendered while the VAE trains)
BASE_BATCH=${BASE_BATCH:-512}
BASE_LR=${BASE_LR:-8e-4}
BASE_STEPS=${BASE_STEPS:-30000}      # the schedule's length, cut by BASE_MINUTES to what fits (saved in the state)
BASE_MINUTES=${BASE_MINUTES:-3.5}
CONCEPT_STEPS=${CONCEPT_STEPS:-1500}
CONCEPT_JOBS=${CONCEPT_JOBS:-14}
CONCEPT_ARGS=${CONCEPT_ARGS:-}       # more flags for scripts/train_concepts.py (e.g. "--batch 24 --prior-batch 12")
EVAL_ARGS=${EVAL_ARGS:-}             # more flags for scripts/train_evaluators.py

ASSETS=src/loraclr/world/assets
RUNS=runs/world-new
mkdir -p "$RUNS/previous"
stamp() { date -u +%H:%M:%S; }

pack() {  # copy what exists so far to $PACK (at most 8 files of <= 16 MiB: the two big weights, one tarball)
  [ -n "$PACK" ] || return 0
  mkdir -p "$PACK"
  if [ -f "$ASSETS/mini-sd/unet/diffusion_pytorch_model.safetensors" ]; then
    cp "$ASSETS/mini-sd/unet/diffusion_pytorch_model.safetensors" "$PACK/unet.safetensors"
    cp "$ASSETS/mini-sd/text_encoder/model.safetensors" "$PACK/text_encoder.safetensors"
  fi
  tar czf "$PACK/.world.tgz" --exclude='mini-sd/unet/*.safetensors' --exclude='mini-sd/text_encoder/*.safetensors' \
    --exclude='mini-sd/tokenizer' -C "$ASSETS" mini-sd evaluators concepts \
    -C "$PWD/$RUNS" --exclude='*.pt' --exclude='previous' --exclude='*/vae/*.safetensors' .
  mv "$PACK/.world.tgz" "$PACK/world.tgz"
}

echo "$(stamp) [1/3] scenes, VAE and base on $DEVICE with $WORKERS workers"
python3 scripts/train_world.py all --device "$DEVICE" --workers "$WORKERS" --seed "$SEED" --size "$SIZE" \
  --vae-pool "$VAE_POOL" --steps "$VAE_STEPS" --vae-batch "$VAE_BATCH" \
  --n "$BASE_POOL" --batch "$BASE_BATCH" --lr "$BASE_LR" --total-steps "$BASE_STEPS" \
  --fit-minutes "$BASE_MINUTES" --minutes 600 --out "$RUNS/mini-sd" --runs "$RUNS"
rm -rf "$RUNS/previous/mini-sd"
mv "$ASSETS/mini-sd" "$RUNS/previous/mini-sd"
mv "$RUNS/mini-sd" "$ASSETS/mini-sd"
pack

echo "$(stamp) [2/3] evaluators (background) and [3/3] concept LoRAs, $CONCEPT_STEPS steps, $CONCEPT_JOBS at once"
rm -rf "$RUNS/previous/evaluators" "$RUNS/previous/concepts"
cp -r "$ASSETS/evaluators" "$RUNS/previous/evaluators"
mkdir -p "$RUNS/previous/concepts"
for f in "$ASSETS"/concepts/*.safetensors "$ASSETS"/concepts/*.pth "$ASSETS"/concepts/manifest.json; do
  [ -e "$f" ] && mv "$f" "$RUNS/previous/concepts/"
done
python3 scripts/train_evaluators.py --device "$DEVICE" --workers "$WORKERS" --seed "$SEED" $EVAL_ARGS \
  > "$RUNS/evaluators.log" 2>&1 &
EVAL_PID=$!
python3 scripts/train_concepts.py --device "$DEVICE" --jobs "$CONCEPT_JOBS" --steps "$CONCEPT_STEPS" \
  --seed "$SEED" --samples 0 --runs "$RUNS/concepts" $CONCEPT_ARGS > "$RUNS/concepts.log" 2>&1 || echo "concepts FAILED (see $RUNS/concepts.log)"
tail -3 "$RUNS/concepts.log"
wait "$EVAL_PID" || echo "evaluators FAILED (see $RUNS/evaluators.log)"
tail -3 "$RUNS/evaluators.log"
pack
echo "$(stamp) done"
