#!/usr/bin/env bash
# The exact command that trained the bundled 64 -> 256 super-resolution stage (ldm/assets/default-upscaler,
# docs/imagen.md) on one lent GPU: tools/train.py with configs/imagen-sr-emoji.yaml on the frozen text tower of the
# bundled CLIP, inside a time limit (an early stop exports the newest checkpoint), then the held-out low-res emoji
# upscaled at several augmentation levels, and the U-Net (EMA weights, fp16) packed into $OUT in parts small enough
# to bring back.
#   LIMIT=420 SR_STEPS=4000 OUT=out bash tools/device_train_sr.sh
# Carried (in carry/): train-*.tar.gz (tools/pack_sr_carry.py), clip-text.st.gz (tools/carry_text_tower.py pack),
# sr-eval.tar.gz (low/ and captions.jsonl of tools/eval_sr.py inputs). Training parts that an earlier call on the same
# machine left in /tmp/sr/data are used too (a transfer is limited in size; two calls carry two disjoint parts).
set -uo pipefail
R=/tmp/sr
TB=$(python3 -c 'import tensorboard' 2>/dev/null && echo tensorboard || echo none)
export PYTHONUNBUFFERED=1
mkdir -p $R/data $R/eval && cp carry/train-*.tar.gz $R/data/ && ls -la $R/data | tee $OUT/data.txt
python3 tools/carry_text_tower.py unpack carry/clip-text.st.gz $R/clip-text.safetensors || exit 1
tar xzf carry/sr-eval.tar.gz -C $R/eval || exit 1
ARGS=(--config configs/imagen-sr-emoji.yaml --train-data "$R/data/*.tar.gz" --output-dir $R/sr
      model.text_encoder.pretrained=$R/clip-text.safetensors progress=false)
timeout "${LIMIT:-420}" python3 tools/train.py "${ARGS[@]}" --max-steps "${SR_STEPS:-4000}" log_with=$TB 2>&1 \
    | grep -v -i warn | tee $OUT/sr-train.log
if [ ! -f $R/sr/unet.safetensors ]; then  # stopped by the time limit: export the newest checkpoint
  last=$(ls $R/sr/checkpoints | sort | tail -1); step=$((10#${last#step-}))
  # no preview grid here: a run resumed at its last step has read no training image to upscale
  python3 tools/train.py "${ARGS[@]}" --resume latest --max-steps $step log_with=none sampling.at_end=false 2>&1 \
      | tail -3 | tee -a $OUT/sr-train.log
fi
for level in ${LEVELS:-0.0 0.1 0.25}; do  # fp16, the GPU default (the sampler's x stays float32: docs/imagen.md)
  python3 tools/eval_sr.py upscale --model $R/sr --inputs $R/eval --out $R/gen/sr-aug$level --aug-level $level \
      --steps 20 --guidance 1 2>&1 | tail -1
done
mkdir -p /tmp/pack && cp -r $R/sr/config.yaml $R/sr/train_config.yaml $R/sr/manifest.json $R/sr/unet.safetensors \
    $R/sr/logs $R/gen /tmp/pack/
tar cf /tmp/sr.tar -C /tmp/pack . && split -b 15M /tmp/sr.tar $OUT/sr.tar.part-
ls -la $OUT
