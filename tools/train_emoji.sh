#!/usr/bin/env bash
# Train the bundled default model in two stages: the emoji autoencoder, then the latent diffusion model on it.
#   bash tools/train_emoji.sh TRAIN_SHARDS VAL_SHARDS OUT_DIR [VAE_STEPS] [UNET_STEPS] [key=value overrides of stage 2]
# Shards come from data_scripts/build_emoji_dataset.py. VAE_EXTRA holds overrides for stage 1 (quoted, space-separated).
# Running it again continues both stages where they stopped (--resume latest; a fresh folder starts fresh).
set -euo pipefail
TRAIN=$1; VAL=$2; OUT=$3; VAE_STEPS=${4:-3000}; UNET_STEPS=${5:-2500}
shift $(( $# < 5 ? $# : 5 ))
PY=${PYTHON:-python3}
# shellcheck disable=SC2086
$PY tools/train_vae.py --config configs/vae-emoji.yaml --train-data "$TRAIN" --val-data "$VAL" \
    --output-dir "$OUT/vae" --max-steps "$VAE_STEPS" --resume latest ${VAE_EXTRA:-}
SCALE=$($PY -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['scale_factor'])" "$OUT/vae/autoencoder.yaml")
echo "stage 1 done: latent scale_factor $SCALE"
$PY tools/train.py --config configs/emoji.yaml --train-data "$TRAIN" --output-dir "$OUT/emoji" --resume latest \
    --max-steps "$UNET_STEPS" model.pretrained.autoencoder="$OUT/vae/autoencoder.safetensors" \
    model.autoencoder.scale_factor="$SCALE" "$@"
