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
timeout "${LIMIT:-430}" python3 tools/train.py "${ARGS[@]}" --max-steps "${SR_STEPS:-4000}" log_with=$TB 2>&1 \
    | grep -v -i warn | tee $OUT/sr-train.log | awk 'NR % 20 == 1'
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ]; then  # 124: the time limit, handled below; anything else is a failure
  echo "error: tools/train.py exited $rc (not the time limit); see $OUT/sr-train.log" | tee -a $OUT/sr-train.log
  exit "$rc"
fi
if [ ! -f $R/sr/unet.safetensors ]; then  # stopped by the time limit: export the newest checkpoint
  last=$(ls $R/sr/checkpoints 2>/dev/null | sort | tail -1)
  if [ -z "$last" ]; then  # stopped before the first checkpoint (checkpoint_every): nothing to export
    echo "error: no checkpoint in $R/sr/checkpoints within LIMIT=${LIMIT:-430} s; lower checkpoint_every (SR_OVERRIDES)" \
        | tee -a $OUT/sr-train.log
    exit 1
  fi
  step=$((10#${last#step-}))
  # no preview grid here: a run resumed at its last step has read no training image to upscale
  python3 tools/train.py "${ARGS[@]}" --resume latest --max-steps $step log_with=none sampling.at_end=false 2>&1 \
      | tail -3 | tee -a $OUT/sr-train.log
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "error: exporting $last failed" | tee -a $OUT/sr-train.log; exit 1; }
fi
tar cf $OUT/sr.tar -C $R/sr config.yaml train_config.yaml manifest.json unet.safetensors logs $(cd $R/sr && ls -d samples 2>/dev/null) || exit 1
ls -la $OUT
