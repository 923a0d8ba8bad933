#!/usr/bin/env bash
# The exact command that trained the bundled model on one lent GPU (docs/default-model.md): both stages inside a
# time limit, then the final model (EMA weights, fp16) packed into $OUT in parts small enough to bring back.
set -uo pipefail
R=/tmp/run; TRAIN='.carry/emoji/train-{00000..00007}.tar.gz'; VAL=.carry/emoji/val-00000.tar.gz
TB=$(python3 -c 'import tensorboard' 2>/dev/null && echo tensorboard || echo none)
export PYTHONUNBUFFERED=1
VAE_EXTRA="loss.disc_start=1000 log_with=$TB" timeout "${LIMIT:-540}" bash tools/train_emoji.sh "$TRAIN" "$VAL" $R \
    "${VAE_STEPS:-1500}" "${UNET_STEPS:-3000}" log_with=$TB 2>&1 | grep -v -i warn | tee $OUT/train.log
if [ ! -f $R/emoji/unet.safetensors ]; then  # stopped by the time limit: export the newest checkpoint
  last=$(ls $R/emoji/checkpoints | sort | tail -1); step=$((10#${last#step-}))
  python3 tools/train.py --config configs/emoji.yaml --train-data "$TRAIN" --output-dir $R/emoji --resume latest \
    --max-steps $step model.pretrained.autoencoder=$R/vae/autoencoder.safetensors \
    model.autoencoder.scale_factor="$(python3 -c "import yaml;print(yaml.safe_load(open('$R/vae/autoencoder.yaml'))['scale_factor'])")" \
    log_with=none 2>&1 | tail -3 | tee -a $OUT/train.log
fi
python3 - <<'PY'
import os, tarfile
from safetensors.torch import load_file, save_file
src, dst = "/tmp/run/emoji", "/tmp/pack/default-model"
os.makedirs(dst, exist_ok=True)
for name in ("unet", "autoencoder", "text_encoder"):
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(f"{src}/{name}.safetensors").items()}
    save_file(sd, f"{dst}/{name}.safetensors", metadata={"format": "pt"})
for extra in ("config.yaml", "tokenizer", "train_config.yaml"):
    if os.path.exists(f"{src}/{extra}"):
        os.system(f"cp -r {src}/{extra} {dst}/")
with tarfile.open("/tmp/pack/model.tar", "w") as t:
    t.add(dst, arcname="default-model")
PY
split -b 15M /tmp/pack/model.tar $OUT/model.tar.part-
cp $R/emoji/samples/$(ls $R/emoji/samples | sort | tail -1) $OUT/samples-final.png
cp $R/vae/metrics.json $OUT/vae-metrics.json; ls -la $OUT
