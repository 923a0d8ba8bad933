#!/usr/bin/env bash
# Issue 17's measurements on one machine of 2 or more GPUs, in one device call of under 10 minutes; results in $OUT
# (docs/multi-gpu.md has them, with this command):
#   OUT=out bash tools/device_multigpu.sh "1 2"
# 1. tests/test_fsdp.py's two-GPU test: FSDP2 and DDP exports agree.
# 2. tools/device_scaling.sh at 256 px (DDP and FSDP2) on each GPU count, eager (--no-compile: a compile per run
#    would take most of the window; the compiled single-GPU step is in docs/benchmarks).
# 3. ldm-eval generation on 1 GPU and on all of them: images/s from the report's `generation` field (the time
#    between barriers, loading and scoring excluded), model = the 256 px run's export (SD-1 shapes, random weights).
# 4. With the time left (BUDGET_S, default 560 s from the start): the 512 px DDP scaling runs.
set -uo pipefail
GPUS=${1:-"1 2"}; N=${GPUS##* }
OUT=${OUT:-$PWD/multigpu}; WORK=${WORK:-/tmp/ldm-scaling}; BUDGET_S=${BUDGET_S:-560}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT" "$WORK"
{ nvidia-smi --query-gpu=index,name,memory.total --format=csv; nvidia-smi topo -m; nproc; } > "$OUT/machine.txt" 2>&1
python3 -c 'import torch, accelerate; print("torch", torch.__version__, "accelerate", accelerate.__version__, "gpus", torch.cuda.device_count())' | tee -a "$OUT/machine.txt"

echo "== 1. FSDP2 vs DDP on two GPUs ($SECONDS s)"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_fsdp.py -k two_gpus -W ignore 2>&1 | tail -15 > "$OUT/fsdp-test.log"
tail -1 "$OUT/fsdp-test.log"

echo "== 2. scaling at 256 px ($SECONDS s)"
OUT="$OUT" WORK="$WORK" TRAIN_ARGS=--no-compile bash tools/device_scaling.sh "$GPUS" 256

echo "== 3. ldm-eval generation on 1 and $N GPUs ($SECONDS s)"
model="$WORK/run-ddp-256-1"
for n in 1 "$N"; do
  rm -rf "$WORK/eval-$n"
  timeout 200 python3 -m ldm.cli.eval --model "$model" --prompts docs/default-model-prompts.txt --samplers dpmpp_2m --steps 25 \
      --guidance 7.5 --batch-size 16 --compile off --num-processes "$n" --out "$WORK/eval-$n" 2>&1 \
      | grep -E '^(generated|error)' | tee -a "$OUT/eval.log"
  python3 -c "import json,sys; r=json.load(open('$WORK/eval-$n/report.json')); print(json.dumps({'run': 'ldm-eval', 'gpus': $n, **(r['generation'] or {})}))" \
      >> "$OUT/scaling.jsonl" 2>> "$OUT/eval.log"
done

if [ $((BUDGET_S - SECONDS)) -gt 200 ]; then
  echo "== 4. DDP scaling at 512 px ($SECONDS s)"
  OUT="$OUT" WORK="$WORK" CONFIGS=ddp STEPS=40 TRAIN_ARGS=--no-compile timeout $((BUDGET_S - SECONDS)) \
      bash tools/device_scaling.sh "$GPUS" 512
else
  echo "== 4. skipped: $SECONDS s of $BUDGET_S used" | tee -a "$OUT/eval.log"
fi
echo "== done ($SECONDS s)"; cat "$OUT/scaling.jsonl"
