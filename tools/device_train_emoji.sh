#!/usr/bin/env bash
# The exact command that trained the bundled U-Net on one lent GPU (docs/default-model.md): tools/train.py on the
# frozen text tower of the bundled CLIP and the bundled autoencoder, inside a time limit (an early stop exports the
# newest checkpoint), then batched samples of the evaluation prompt sets at guidance 1/3/5/7, and the U-Net (EMA
# weights, fp16) packed into $OUT in parts small enough to bring back.
#   LIMIT=420 UNET_STEPS=4500 OUT=out bash tools/device_train_emoji.sh
# Carried: .carry/emoji/train-*.tar.gz (tools/pack_carry.py), .carry/clip-text.st.gz (tools/carry_text_tower.py pack),
# .carry/*-prompts.txt; the autoencoder is the committed ldm/assets/default-model/autoencoder.safetensors.
set -uo pipefail
R=/tmp/run; TRAIN='.carry/emoji/train-{00000..00007}.tar.gz'; VAE=${VAE:-../ldm/assets/default-model/autoencoder.safetensors}
TB=$(python3 -c 'import tensorboard' 2>/dev/null && echo tensorboard || echo none)
export PYTHONUNBUFFERED=1
mkdir -p $R && python3 tools/carry_text_tower.py unpack .carry/clip-text.st.gz $R/clip-text.safetensors || exit 1
ARGS=(--config configs/emoji.yaml --train-data "$TRAIN" --output-dir $R/emoji model.pretrained.autoencoder=$VAE
      model.text_encoder.pretrained=$R/clip-text.safetensors progress=false)
timeout "${LIMIT:-420}" python3 tools/train.py "${ARGS[@]}" --max-steps "${UNET_STEPS:-4500}" log_with=$TB 2>&1 \
    | grep -v -i warn | tee $OUT/unet-train.log
if [ ! -f $R/emoji/unet.safetensors ]; then  # stopped by the time limit: export the newest checkpoint
  last=$(ls $R/emoji/checkpoints | sort | tail -1); step=$((10#${last#step-}))
  python3 tools/train.py "${ARGS[@]}" --resume latest --max-steps $step log_with=none 2>&1 | tail -3 | tee -a $OUT/unet-train.log
fi
for set in val grid; do
  python3 tools/eval_default_model.py generate --model $R/emoji --prompts .carry/$set-prompts.txt --guidance 1 3 5 7 \
      --out $R/gen/$set 2>&1 | grep -v -i warn | tail -4
done
python3 tools/eval_default_model.py generate --model $R/emoji --prompts ldm_eval_v1 --guidance 5 --out $R/gen/ldm_eval_v1 \
    2>&1 | tail -1
python3 - <<'PY'
import os, tarfile
from safetensors.torch import load_file, save_file
src, dst = "/tmp/run/emoji", "/tmp/pack/default-model"
os.makedirs(dst, exist_ok=True)
sd = {k: v.half().contiguous() for k, v in load_file(f"{src}/unet.safetensors").items()}
save_file(sd, f"{dst}/unet.safetensors", metadata={"format": "pt"})
for extra in ("config.yaml", "train_config.yaml", "logs", "samples"):
    os.system(f"cp -r {src}/{extra} {dst}/")
with tarfile.open("/tmp/pack/model.tar", "w") as t:
    t.add(dst, arcname="default-model")
    if os.path.isdir("/tmp/run/gen"):
        t.add("/tmp/run/gen", arcname="gen")
PY
split -b 15M /tmp/pack/model.tar $OUT/model.tar.part-
ls -la $OUT
