#!/usr/bin/env bash
# The exact command that trained the bundled 64 -> 256 super-resolution stage (ldm/assets/default-upscaler,
# docs/imagen.md) on one lent GPU: tools/train.py with configs/imagen-sr-emoji.yaml on the frozen text tower of the
# bundled CLIP (ldm/assets/clip-emoji, in the repository), inside a time limit (an early stop exports the newest
# checkpoint); the U-Net (EMA weights) and the training logs come back in $OUT. The held-out evaluation runs at home
# (tools/eval_sr.py), on the CPU.
#   CUDA_VISIBLE_DEVICES=0 LIMIT=430 SR_STEPS=4000 OUT=out bash tools/device_train_sr.sh .dev/sr/train-*.tar.gz
# The arguments: training parts written by tools/pack_sr_carry.py (a transfer is limited in size). Each is split into
# SHARDS plain .tar shards here, so that every data-loader worker has shards to read: webdataset gives each worker
# whole shards, and one shard kept one worker busy and the GPU waiting (190 img/s in the first run).
set -uo pipefail
R=/tmp/sr; SHARDS=${SHARDS:-16}
OUT=${OUT:?set OUT to the folder that receives sr.tar and sr-train.log}; mkdir -p "$OUT"
TB=$(python3 -c 'import tensorboard' 2>/dev/null && echo tensorboard || echo none)
export PYTHONUNBUFFERED=1
rm -rf $R && mkdir -p $R/data
python3 tools/split_shards.py --out $R/data --shards "$SHARDS" "$@" || exit 1
ARGS=(--config configs/imagen-sr-emoji.yaml --train-data "$R/data/{00000..$(printf %05d $((SHARDS - 1)))}.tar"
      --output-dir $R/sr progress=false ${SR_OVERRIDES:-})  # SR_OVERRIDES: config overrides (a CPU dry run: smaller batch)
source tools/timed_train.sh
# the export writes no preview grid: a run resumed at its last step has read no training image to upscale
LOG_WITH=$TB EXPORT_ARGS=sampling.at_end=false timed_train "${LIMIT:-430}" "${SR_STEPS:-4000}" $OUT/sr-train.log 20 $R/sr "${ARGS[@]}" || exit
tar cf $OUT/sr.tar -C $R/sr config.yaml train_config.yaml manifest.json unet.safetensors logs $(cd $R/sr && ls -d samples 2>/dev/null) || exit 1
ls -la $OUT
