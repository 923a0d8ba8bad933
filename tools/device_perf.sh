#!/usr/bin/env bash
# Issue 12's missing rows in one GPU window of at most ~9 minutes, each benchmark in its own process under a hard
# timeout (a hang or a slow compile costs only its own step), in priority order:
#   1. unet_step_sd15_512_b1_cfg, clean (nothing else on this GPU), reduce-overhead both sides, with the lever
#      table: eager levers one at a time, then compiled ones while its budget lasts -> $OUT/levers.jsonl
#   2. train_sd15_unet_512, compiled training step, both sides (rows as they come: both eager; ours compiled with
#      the peer eager; both compiled)
#   3. train_sd15_unet_256, the same, when enough time is left
#   4. eval_generate_sd15_512_25steps (eager, best of batch 8 and 16), when enough time is left
# Rows go to $OUT/results.jsonl as each benchmark finishes; a step killed by its timeout, or skipped for lack of
# time, gets a row with `ours: null` and details.error saying so. Everything is logged to $OUT/perf.log.
#
#   CUDA_VISIBLE_DEVICES=1 PYTHONPATH=/tmp/site:$PWD OUT=out bash tools/device_perf.sh       # on the GPU machine
#   DRY_RUN=1 OUT=/tmp/dry PYTHONPATH=$PWD bash tools/device_perf.sh                  # every step on the CPU
#
# BUDGET_S (default 500) is the whole script's wall-clock limit; PYTHON (default python3) the interpreter.
set -u
OUT=${OUT:?set OUT to the folder that receives results.jsonl, levers.jsonl and perf.log}
BUDGET_S=${BUDGET_S:-500}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
LOG=$OUT/perf.log
START=$(date +%s)
COMMON=(--out "$RESULTS")
if [ -n "${DRY_RUN:-}" ]; then
    COMMON+=(--dry-run --batch-256 2 --batch-512 2)
fi
export PYTHONWARNINGS=ignore  # diffusers' and dynamo's repeated warnings would crowd the log
export HF_HUB_OFFLINE=1

rows() { local n; n=$(grep -c "\"benchmark\": \"$1\"" "$RESULTS" 2>/dev/null); echo "${n:-0}"; }

left() { echo $((BUDGET_S - ($(date +%s) - START))); }

log() { echo "[$(date -u +%H:%M:%S) +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

error_row() {  # benchmark, message: a row that says why there is no number (no torch import: seconds matter)
    "$PY" -c 'import json, sys, datetime
row = {"benchmark": sys.argv[1], "ours": None, "peer": None, "peer_name": None, "speedup": None, "unit": None,
       "mfu": None, "device": "GPU (tools/device_perf.sh)", "torch": None,
       "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
       "command": "bash tools/device_perf.sh", "details": {"error": sys.argv[2]}}
open(sys.argv[3], "a").write(json.dumps(row) + "\n")' "$1" "$2" "$RESULTS"
}

# step NAME CAP_S MIN_S [bench.py arguments...]: run bench.py for NAME under min(CAP_S, time left), if at least
# MIN_S are left; --budget-s tells bench.py (its optional extras) when its own time is up, 15 s before the kill
step() {
    local name=$1 cap=$2 need=$3 remaining limit rc rows_before
    shift 3
    remaining=$(left)
    if [ "$remaining" -lt "$need" ]; then
        log "skip $name: ${remaining} s left of ${BUDGET_S}, needs ~${need} s"
        error_row "$name" "skipped: ${remaining} s were left of the ${BUDGET_S} s window, it needs ~${need} s"
        return
    fi
    limit=$((cap < remaining ? cap : remaining))
    log "start $name (limit ${limit} s)"
    rows_before=$(rows "$name")
    timeout --kill-after=10 "$limit" "$PY" tools/bench.py "${COMMON[@]}" --only "$name" \
        --budget-s $((limit > 30 ? limit - 15 : limit)) "$@" >>"$LOG" 2>&1
    rc=$?
    log "end $name: exit $rc"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        if [ "$(rows "$name")" -gt "$rows_before" ]; then
            error_row "$name" "killed by tools/device_perf.sh at its ${limit} s limit (exit $rc) after its first \
row(s) were written: what followed (the compiled training step; unet_step's compiled levers) did not finish"
        else
            error_row "$name" "killed by tools/device_perf.sh at its ${limit} s limit (exit $rc); see perf.log"
        fi
    elif [ "$rc" -ne 0 ]; then
        error_row "$name" "tools/bench.py exited $rc; see perf.log"
    fi
}

log "device_perf.sh: budget ${BUDGET_S} s, OUT=$OUT, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")' >>"$LOG" 2>&1
nvidia-smi --query-gpu=index,name,utilization.gpu,memory.used --format=csv >>"$LOG" 2>&1

# --budget-s 190: unet_step's optional compiled levers start only while they leave training its time (the last
# --budget-s given wins over step's own)
step unet_step_sd15_512_b1_cfg 250 60 --levers "$OUT/levers.jsonl" --budget-s 190
step train_sd15_unet_512 300 120
step train_sd15_unet_256 300 150
step eval_generate_sd15_512_25steps 150 75 --eager
log "done: $(cat "$RESULTS" 2>/dev/null | wc -l) rows in $RESULTS, $(cat "$OUT/levers.jsonl" 2>/dev/null | wc -l) levers"
