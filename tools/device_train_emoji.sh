#!/usr/bin/env bash
# Trains the bundled U-Net on one lent GPU (docs/default-model.md): tools/train.py on the frozen text tower of the
# bundled CLIP and the bundled autoencoder, inside a time limit (an early stop exports the newest checkpoint), then
# batched samples of the evaluation prompt sets at guidance 1/3/5/7, and the U-Net (EMA weights, fp16) packed into
# $OUT in parts small enough to bring back.
#   OUT=out LIMIT=420 UNET_STEPS=4500 TEXT_TOWER=.carry/clip-text.st.gz SHARDS=8 \
#       bash tools/device_train_emoji.sh .carry/emoji/train-*.tar.gz                   (the first run, 1,500 steps)
#   OUT=out LIMIT=390 UNET_STEPS=1500 PRETRAINED=ldm/assets/default-model PROMPTS=/tmp/keep/ub \
#       UNET_OVERRIDES="compile=false checkpoint_every=250" bash tools/device_train_emoji.sh /tmp/keep/u*/train-*.tar.gz
#   (continued from the bundled U-Net's weights, with a fresh optimizer and EMA; the shipped U-Net is two such runs:
#    this one, then UNET_STEPS=1400 with optim.lr=0.0003 added; docs/default-model.md)
# The arguments: the training shards (tools/pack_carry.py: WebP, no json members). They are regrouped into SHARDS
# plain shards (tools/split_shards.py) so that all data-loader workers read. Carried beside them: $PROMPTS/val-prompts.txt
# and grid-prompts.txt. The text tower is the bundled CLIP's (configs/emoji.yaml); TEXT_TOWER=FILE.st.gz takes one
# packed by tools/carry_text_tower.py instead (the first run's way, before the CLIP was in the repository).
# UNET_OVERRIDES: more config overrides (a CPU dry run: data.batch_size=4 data.num_workers=0 ...).
set -uo pipefail
R=${RUN_DIR:-/tmp/run}; SHARDS=${SHARDS:-28}; PROMPTS=${PROMPTS:-.carry}
OUT=${OUT:?set OUT to the folder that receives model.tar.part-* and unet-train.log}; mkdir -p "$OUT"
VAE=${VAE:-ldm/assets/default-model/autoencoder.safetensors}
TB=$(python3 -c 'import tensorboard' 2>/dev/null && echo tensorboard || echo none)
export PYTHONUNBUFFERED=1
rm -rf "$R" && mkdir -p "$R"
python3 tools/split_shards.py --out "$R/data" --shards "$SHARDS" "$@" || exit 1
ARGS=(--config configs/emoji.yaml --train-data "$R/data/{00000..$(printf %05d $((SHARDS - 1)))}.tar"
      --output-dir $R/emoji model.pretrained.autoencoder=$VAE progress=false)
if [ -n "${TEXT_TOWER:-}" ]; then
  python3 tools/carry_text_tower.py unpack "$TEXT_TOWER" $R/clip-text.safetensors || exit 1
  ARGS+=(model.text_encoder.pretrained=$R/clip-text.safetensors)
fi
[ -n "${PRETRAINED:-}" ] && ARGS+=(model.pretrained.unet=$PRETRAINED)
ARGS+=(${UNET_OVERRIDES:-})
source tools/timed_train.sh
LOG_WITH=$TB timed_train "${LIMIT:-420}" "${UNET_STEPS:-4500}" $OUT/unet-train.log 10 $R/emoji "${ARGS[@]}" || exit
for set in val grid; do
  python3 tools/eval_default_model.py generate --model $R/emoji --prompts $PROMPTS/$set-prompts.txt \
      --guidance ${GUIDANCE:-1 3 5 7} --out $R/gen/$set ${GEN_ARGS:-} 2>&1 | grep -v -i warn | tail -4
done
python3 - "$R" <<'PY'
import os, sys, tarfile
from safetensors.torch import load_file, save_file
run = sys.argv[1]
src, dst = f"{run}/emoji", f"{run}/pack/default-model"
os.makedirs(dst, exist_ok=True)
sd = {k: v.half().contiguous() for k, v in load_file(f"{src}/unet.safetensors").items()}
save_file(sd, f"{dst}/unet.safetensors", metadata={"format": "pt"})
for extra in ("config.yaml", "train_config.yaml", "logs", "samples"):
    os.system(f"cp -r {src}/{extra} {dst}/ 2>/dev/null")
with tarfile.open(f"{run}/pack/model.tar", "w") as t:
    t.add(dst, arcname="default-model")
    if os.path.isdir(f"{run}/gen"):
        t.add(f"{run}/gen", arcname="gen")
PY
[ $? -eq 0 ] || exit 1
split -b 15M "$R/pack/model.tar" "$OUT/model.tar.part-" || exit 1
ls -la $OUT
