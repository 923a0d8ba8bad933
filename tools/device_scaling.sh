#!/usr/bin/env bash
# The measurements of issue 17 §3 (docs/multi-gpu.md), on one machine of N GPUs; results in $OUT (default ./scaling):
#   tools/train.py on SD-1 at 256 and 512 px from precomputed latents, DDP and FSDP2, on 1, 2, 4, ... N GPUs:
#   img/s (all GPUs; divide by the GPU count for per GPU) and peak memory per GPU, one JSON line per run.
# The SD-1 autoencoder and CLIP text encoder are random (no weights on the machine): the same shapes and FLOPs as
# the real ones, and precompute_latents.py / train.py build them from the same seed, so the latents match.
#   bash tools/device_scaling.sh "1 2 4 8" "256 512"
# Environment: STEPS (60), CONFIGS ("ddp fsdp2"), TRAIN_ARGS (extra tools/train.py arguments, e.g. --no-compile),
# BASE (configs/sd-v1.yaml), OVERRIDES (config overrides) and DEVICE (cuda): BASE=configs/tiny.yaml DEVICE=cpu
# OVERRIDES=model.text_encoder.freeze=true ACCELERATE_USE_CPU=true CONFIGS=ddp bash tools/device_scaling.sh 1 32 is the same path on a CPU in a minute.
set -uo pipefail
GPUS=${1:-"1 2"}
RESOLUTIONS=${2:-"256 512"}
STEPS=${STEPS:-60}  # img/s is read from the last log window (steps 41-60): no start-up, no compile
OUT=${OUT:-$PWD/scaling}
WORK=${WORK:-/tmp/ldm-scaling}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

python3 - "$WORK" "${BASE:-configs/sd-v1.yaml}" ${OVERRIDES:-} <<'EOF'
import sys
from ldm.config import apply_overrides, load_yaml, save_yaml
work = sys.argv[1]
config = apply_overrides(load_yaml(sys.argv[2]), [
    "model.random_autoencoder=true", "model.text_encoder.pretrained=null", "model.unet.use_checkpoint=false",
    "sampling.every=0", "sampling.at_end=false", "log_with=none", "progress=false", "checkpoint_every=1000000",
    "log_every=20", "optim.warmup_steps=0", "ema.enabled=true",
    "data.min_size=null", *sys.argv[3:]])  # synthetic shards carry no img2dataset original size: sd-v1's 512 px filter drops all
save_yaml(config, f"{work}/sd1-random.yaml")
EOF

for res in $RESOLUTIONS; do
  if [ ! -f "$WORK/lat$res/latents_meta.json" ]; then
    python3 -c "from ldm.data.synthetic import write_shape_shards as w; w('$WORK/img$res', 2048, seed=0, image_size=$res, samples_per_shard=128)"
    python3 data_scripts/precompute_latents.py --model "$WORK/sd1-random.yaml" --shards "$WORK/img$res" \
      --out "$WORK/lat$res" --resolution "$res" --batch-size 32 --device "${DEVICE:-cuda}" --dtype "$([ "${DEVICE:-cuda}" = cpu ] && echo fp32 || echo bf16)" --no-progress
  fi
  batch=$([ "$res" = 256 ] && echo 64 || echo 16)  # per GPU: the batch of docs/multi-gpu.md at 256 px, a quarter at 512
  for n in $GPUS; do
    for cfg in ${CONFIGS:-ddp fsdp2}; do  # CONFIGS=ddp: DDP only
      run="$WORK/run-$cfg-$res-$n"
      rm -rf "$run"
      timeout 900 accelerate launch --config_file "configs/accelerate/$cfg.yaml" --num_processes "$n" \
        --main_process_port 0 tools/train.py --config "$WORK/sd1-random.yaml" --train-data "$WORK/lat$res" \
        --output-dir "$run" --max-steps "$STEPS" data.sample_format=latent loss.inputs=latents \
        data.resolution="$res" data.batch_size="$batch" data.num_workers=4 ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train-$cfg-$res-$n.log" \
        | grep -E '^(step|FSDP2|parameters|error)'
      python3 - "$OUT/train-$cfg-$res-$n.log" "$cfg" "$res" "$n" "$batch" >> "$OUT/scaling.jsonl" <<'EOF'
import json, re, sys
log, cfg, res, n, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
lines = [l for l in open(log) if l.startswith("step ")]
fields = {k: float(v) for k, v in re.findall(r"(img/s|peak_mem_gib) ([0-9.]+)", lines[-1])} if lines else {}
ips = fields.get("img/s")  # None (JSON null) when the run logged no step: see its log
print(json.dumps({"run": "tools/train.py sd-v1 latents", "strategy": cfg, "resolution": res, "gpus": n,
                  "batch_per_gpu": batch, "img_per_s": ips, "img_per_s_per_gpu": None if ips is None else ips / n,
                  "peak_mem_gib": fields.get("peak_mem_gib"), "failed": ips is None}))
EOF
    done
  done
done
cat "$OUT/scaling.jsonl"
