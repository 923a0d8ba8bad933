#!/usr/bin/env bash
# The exact command that trained the bundled CLIP on one lent GPU (docs/default-model.md): tools/train_clip.py inside a
# time limit (an early stop exports the newest checkpoint), then the export in fp16 packed into $OUT in parts.
#   LIMIT=300 CLIP_STEPS=1200 OUT=out bash tools/device_train_clip.sh
set -uo pipefail
R=/tmp/run; TRAIN='.carry/emoji/train-{00000..00007}.tar.gz'; VAL=.carry/emoji/val-00000.tar.gz
TB=$(python3 -c 'import tensorboard' 2>/dev/null && echo tensorboard || echo none)
export PYTHONUNBUFFERED=1
ARGS=(--config configs/clip-emoji.yaml --train-data "$TRAIN" --val-data "$VAL" --output-dir $R/clip progress=false)
timeout "${LIMIT:-300}" python3 tools/train_clip.py "${ARGS[@]}" --max-steps "${CLIP_STEPS:-1200}" log_with=$TB 2>&1 \
    | grep -v -i warn | tee $OUT/clip-train.log
if [ ! -f $R/clip/clip-emoji.safetensors ]; then  # stopped by the time limit: export the newest checkpoint
  last=$(ls $R/clip/checkpoints | sort | tail -1); step=$((10#${last#step-}))
  python3 tools/train_clip.py "${ARGS[@]}" --resume latest --max-steps $step log_with=none 2>&1 | tail -3 | tee -a $OUT/clip-train.log
fi
python3 - <<'PY'
import os, tarfile
from safetensors.torch import load_file, save_file
src, dst = "/tmp/run/clip", "/tmp/pack/clip-emoji"
os.makedirs(dst, exist_ok=True)
sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(f"{src}/clip-emoji.safetensors").items()}
save_file(sd, f"{dst}/clip-emoji.safetensors", metadata={"format": "pt", "open_clip_model": "clip-emoji"})
for extra in ("clip-emoji.json", "metrics.json", "config.yaml", "logs"):
    os.system(f"cp -r {src}/{extra} {dst}/")
with tarfile.open("/tmp/pack/clip.tar", "w") as t:
    t.add(dst, arcname="clip-emoji")
PY
split -b 15M /tmp/pack/clip.tar $OUT/clip.tar.part-
cat $R/clip/metrics.json; ls -la $OUT
