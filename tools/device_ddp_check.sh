#!/usr/bin/env bash
# The multi-GPU checks of docs/multi-gpu.md, as run on a lent 2-GPU machine (one command, results in $OUT):
# 1. tools/train.py under `accelerate launch --num_processes 2` with 3 uneven shards (25/25/10 samples) and
#    2 workers per rank (fewer shards than ranks x workers): it must finish, and the loop's end-of-run check must
#    report identical parameters on both ranks.
# 2. Data-parallel scaling of the SD-1 U-Net training step, 1 vs 2 GPUs, plain fp32 all-reduce and bf16-compressed.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "
from ldm.data.synthetic import write_shape_shards
write_shape_shards('/tmp/shards', 60, seed=0, image_size=32, samples_per_shard=25)"
ls /tmp/shards
timeout 200 accelerate launch --multi_gpu --num_processes 2 tools/train.py --config configs/tiny.yaml \
  --train-data '/tmp/shards/{00000..00002}.tar' --output-dir /tmp/ddp --max-steps 40 data.num_workers=2 \
  data.batch_size=8 log_with=none 'mixed_precision="bf16"' progress=false 2>&1 | grep -v -i warn | tee $OUT/ddp_train.log | tail -5
echo "train exit: ${PIPESTATUS[0]}" | tee -a $OUT/ddp_train.log
for cfg in "1 none" "2 none" "2 bf16"; do
  set -- $cfg
  timeout 120 torchrun --nproc_per_node $1 tools/bench_ddp.py --resolution 256 --batch 64 --steps 8 --compress $2 \
    --out $OUT/scaling.jsonl 2>&1 | grep '^{' 
done
