#!/usr/bin/env bash
# Issue 12's missing rows in one GPU window of at most ~9 minutes, each benchmark in its own process under a hard
# timeout (a hang or a slow compile costs only its own step), in the priority order PLAN names:
#
# PLAN=run15 (the default: the issue's last unmeasured lever, the largest training batch, with and without activation
#   checkpointing; run 3's 135.0 img/s was batch 32 without)
#   1. train_sd15_unet_512 --batch-512 64, compiled, ours alone (~250 s)
#   2. train_sd15_unet_512 --batch-512 128 --activation-checkpointing, compiled, ours alone (~90 s eager + a
#      187 s compile + timing: run 13's 280 s cut it; give it its own window, FROM=2 BUDGET_S=500)
# PLAN=run14 (what cuDNN's algorithm search is worth: cudnn.benchmark, on in tools/bench.py, off in
#   the CLIs; run 12 measured it)
#   1. unet_step_sd15_512_b1_cfg --compiled-levers-only: the fast path, and without cudnn.benchmark (~60 + 60 s)
#   2. vae_encode_256 with cuDNN's heuristics, both sides (the row with the search: run 7)
#   3. txt2img_sd15_512_50steps_b1 with cuDNN's heuristics, both sides (the row with the search: run 11)
# PLAN=run13 (three levers never timed graphed, and the 50-step image)
#   1. unet_step_sd15_512_b1_cfg --compiled-levers-only: the fast path, SDPA preferring cuDNN attention, inductor's
#      programmatic dependent launch, combo kernels, cuDNN attention profiled, GroupNorm as channel sums (run 10's
#      unexplained -9.4%) (~60 + 5 x 90 s)
#   2. txt2img_sd15_512_50steps_b1: the 50-step image, both sides compiled (last measured in run 1)
#   3. the same with ours preferring cuDNN attention (--sdpa cudnn)
# PLAN=run12 (run 10's unexplained -9.4% of GroupNorm as channel sums, whose GPU time was unchanged,
#   and the 50-step image, last measured in run 1)
#   1. unet_step_sd15_512_b1_cfg --compiled-levers-only: compile default profiled, the fast path, the channel-sums
#      GroupNorm under reduce-overhead, in one process (~90 + 60 + 90 s)
#   2. txt2img_sd15_512_50steps_b1: the 50-step image, both sides compiled
# PLAN=run11 (run 10: the Triton GroupNorm(+SiLU) kernel against the fast path, run 9's call 5 having timed
#   the reference path; first run `python3 -m pytest -q tests/test_fused_group_norm.py -k cuda`)
#   1. unet_step_sd15_512_b1_cfg --compiled-levers-only: the fast path, the kernel under reduce-overhead, then GPU
#      time by kernel kind under compile default without and with the kernel (~80 + 60 + 70 + 70 s)
#   2. train_sd15_unet_512 --fp8 --no-peer: the compiled FP8 training step
# PLAN=run10 (the peer in its fastest mode, and max-autotune's choices without prologue fusion; give
#   TUNE_CACHE=docs/benchmarks/tune-cache)
#   1. unet_step_sd15_512_b1_cfg --compiled-levers-only: diffusers' U-Net compiled reduce-overhead, then
#      max-autotune (never measured), then ours with max-autotune's options and prologue_fusion off, while time lasts
#   2. train_sd15_unet_512 --fp8 --no-peer: the compiled FP8 training step
# PLAN=run9 (why max-autotune's step, 10.08 ms in run 8, is slower than the fast path's 7.23-7.56 ms
#   although its kernels, each timed alone, predicted ~5.8-6.1 ms; give TUNE_CACHE=docs/benchmarks/tune-cache, run
#   8's 55 tuned shapes, so that no shape is tuned again on an H200 with torch 2.11)
#   1. unet_step_sd15_512_b1_cfg --compiled-levers-only: the fast path, then max-autotune, in one process (~400 s)
#   2. the same: GPU time by kernel kind, compile default, then max-autotune's kernel choices without CUDA graphs
#   3. train_sd15_unet_512 --fp8 --no-peer: the compiled FP8 training step
# PLAN=run8 (max-autotune's guided step, whose compile outran two 9-minute calls in run 7; with
#   TUNE_CACHE, below, each call goes on where the last one stopped)
#   1. unet_step_sd15_512_b1_cfg --compiled-levers-only --lever-names max-autotune, however long it takes (the
#      step's limit is the window's; bench.py's own budget check is lifted)
#   2. the same, --lever-names "the fast path, again": reduce-overhead in the same window, for the comparison
#   3. train_sd15_unet_512 --fp8 --no-peer: the compiled FP8 training step
# PLAN=run7 (run6's steps with the compiled VAE encode added, and the eager GroupNorm without casts)
#   1. eval_generate_sd15_512_25steps --eval-batches 16: both eager, ours compiled, the peer compiled
#   2. vae_encode_256: both sides compiled (never measured; run 1's row is eager), the eager times in details
#   3. unet_step_sd15_512_b1_cfg --compiled-levers-only --lever-names "graphs alone" mask max-autotune
#   4. train_sd15_unet_512 --fp8 --no-peer: the compiled FP8 training step
# PLAN=run6 (what run 5 left unmeasured, docs/benchmarks/README.md "Run 5")
#   1. eval_generate_sd15_512_25steps --eval-batches 16: eager, ours compiled, then the peer compiled (both sides
#      were best at batch 16): the prompt-set goal against the peer at its best
#   2. train_sd15_unet_512 --fp8 --no-peer: the compiled FP8 training step, in a limit its compile fits
#   3. unet_step_sd15_512_b1_cfg --compiled-levers-only --lever-names "graphs alone" mask max-autotune
# PLAN=run5 (the guided step's compiled levers, then the training goals, then prompt sets)
#   1. unet_step_sd15_512_b1_cfg --compiled-levers-only: kernel time by kind (compile default), the fast path again,
#      + FP8 linears, + freezing, CUDA graphs alone, the mask kept, max-autotune -> $OUT/levers.jsonl, no row
#   2. train_sd15_unet_256 --batch-256 128: the largest batch the 256 px goal was not yet tried at (eager, then
#      ours compiled against the peer eager; the both-compiled row as time allows)
#   3. train_sd15_unet_512 --fp8 --no-peer: ours with FP8 transformer linears, eager and compiled
#   4. eval_generate_sd15_512_25steps: as run4's step 2
# PLAN=run4 (what runs 1-3 left unmeasured, docs/benchmarks/README.md)
#   1. train_sd15_unet_256: both eager; ours compiled with the peer eager; both compiled (rows as they come)
#   2. eval_generate_sd15_512_25steps: both eager (as runs 1-3, best of batch 8 and 16), then ours with the fast
#      path as ldm-eval runs it (compile_pipeline) at each batch size, then the peer compiled while time is left
#   3. train_sd15_unet_512 --train-both-compiled: only the both-compiled row (run 3 has the other two; its peer's
#      compile outran a 300 s limit, ours took 126 s): a 420 s limit
#   4. unet_step_sd15_512_b1_cfg --compiled-levers-only: the guided step's compiled levers (CUDA graphs alone,
#      compile default, reduce-overhead with the mask) -> $OUT/levers.jsonl, no row
# PLAN=run3 (the script that produced run 3, 2026-11-29T20:1x)
#   1. unet_step_sd15_512_b1_cfg with the lever table; 2. train_sd15_unet_512; 3. train_sd15_unet_256;
#   4. eval_generate_sd15_512_25steps --eager
#
# FROM=N (default 1) starts at the plan's step N: a second window continues where the first one's log says it
# skipped. TO=N (default: the last) stops after step N, so a window does not start a step the next one repeats.
# Rows go to $OUT/results.jsonl as each benchmark finishes; a step killed by its timeout, or skipped for lack of
# time, gets a row with `ours: null` and details.error saying so. Everything is logged to $OUT/perf.log.
#
#   CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/site:$PWD OUT=out BUDGET_S=560 bash tools/device_perf.sh   # GPU machine
#   CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/site:$PWD OUT=out BUDGET_S=560 FROM=2 bash tools/device_perf.sh
#   DRY_RUN=1 OUT=/tmp/dry PYTHONPATH=$PWD bash tools/device_perf.sh                  # every step on the CPU
#
# TUNE_CACHE=DIR (optional) keeps inductor's autotune choices across windows: TORCHINDUCTOR_CACHE_DIR is
# TUNE_WORK (default /tmp/ldm-inductor); DIR's files seed TUNE_WORK/cache (never over a newer one a warm machine
# still has), and after every step TUNE_WORK/cache is copied to $OUT/tune-cache (small JSON: per shape, each
# choice's time). Inductor writes that file after each shape it tunes, so a shape tuned once, even in a call killed
# mid-compile, is not benchmarked again: carry $OUT/tune-cache back as the next call's DIR.
#
# BUDGET_S (default 500; 1500 with DRY_RUN, whose steps all run whatever their GPU estimates) is the whole
# script's wall-clock limit; PYTHON (default python3) the interpreter.
set -u
OUT=${OUT:?set OUT to the folder that receives results.jsonl, levers.jsonl and perf.log}
BUDGET_S=${BUDGET_S:-$([ -n "${DRY_RUN:-}" ] && echo 1500 || echo 500)}
PY=${PYTHON:-python3}
PLAN=${PLAN:-run15}
FROM=${FROM:-1}
TO=${TO:-9}
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
if [ -n "${TUNE_CACHE:-}" ]; then
    TUNE_WORK=${TUNE_WORK:-/tmp/ldm-inductor}
    export TORCHINDUCTOR_CACHE_DIR=$TUNE_WORK
    mkdir -p "$TUNE_WORK/cache" "$OUT/tune-cache"
    if [ -d "$TUNE_CACHE" ]; then
        cp -n "$TUNE_CACHE"/* "$TUNE_WORK/cache/" 2>/dev/null
    fi
fi

save_tune_cache() {  # the autotune choices so far, for the next window (no-op without TUNE_CACHE)
    if [ -n "${TUNE_CACHE:-}" ]; then
        cp "$TUNE_WORK"/cache/* "$OUT/tune-cache/" 2>/dev/null
        log "tune cache: $("$PY" -m ldm.bench.autotune --count-cache "$TUNE_WORK"/cache/* 2>/dev/null || echo 0) tuned shapes, copied to $OUT/tune-cache"
    fi
}

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
    if [ -n "${DRY_RUN:-}" ]; then
        need=1  # the toy networks take seconds: every path runs, whatever the GPU estimate
    fi
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
    save_tune_cache
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        if [ "$(rows "$name")" -gt "$rows_before" ]; then
            error_row "$name" "killed by tools/device_perf.sh at its ${limit} s limit (exit $rc) after its first \
row(s) were written: what followed (the compiled training step, eval_generate's compiled pass, unet_step's \
compiled levers) did not finish"
        else
            error_row "$name" "killed by tools/device_perf.sh at its ${limit} s limit (exit $rc); see perf.log"
        fi
    elif [ "$rc" -ne 0 ]; then
        error_row "$name" "tools/bench.py exited $rc; see perf.log"
    fi
}

# nth N NAME CAP_S MIN_S [arguments...]: the plan's step N, unless FROM says a previous window ran it
nth() {
    local n=$1
    shift
    if [ "$n" -lt "$FROM" ]; then
        log "step $n ($1): before FROM=$FROM, not run"
        return
    fi
    if [ "$n" -gt "$TO" ]; then
        log "step $n ($1): after TO=$TO, not run"
        return
    fi
    log "step $n of PLAN=$PLAN"
    step "$@"
}

case $PLAN in
    run3|run4|run5|run6|run7|run8|run9|run10|run11|run12|run13|run14|run15) ;;
    *) echo "tools/device_perf.sh: unknown PLAN=$PLAN; choose run15 (the default), run14, run13, run12, run11, run10, run9, run8, run7, run6, run5, run4 or run3" >&2
       exit 2 ;;
esac
case $FROM in
    1|2|3|4) ;;
    *) echo "tools/device_perf.sh: FROM=$FROM is not a step of the plan; give 1, 2, 3 or 4" >&2; exit 2 ;;
esac
case $TO in
    1|2|3|4|9) ;;
    *) echo "tools/device_perf.sh: TO=$TO is not a step of the plan; give 1, 2, 3 or 4 (or leave it out)" >&2; exit 2 ;;
esac
log "device_perf.sh: PLAN=$PLAN FROM=$FROM, budget ${BUDGET_S} s, OUT=$OUT, CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")' >>"$LOG" 2>&1
nvidia-smi --query-gpu=index,name,utilization.gpu,memory.used --format=csv >>"$LOG" 2>&1

if [ "$PLAN" = run3 ]; then
    # --budget-s 190: unet_step's optional compiled levers start only while they leave training its time (the
    # last --budget-s given wins over step's own)
    nth 1 unet_step_sd15_512_b1_cfg 250 60 --levers "$OUT/levers.jsonl" --budget-s 190
    nth 2 train_sd15_unet_512 300 120
    nth 3 train_sd15_unet_256 300 150
    nth 4 eval_generate_sd15_512_25steps 150 75 --eager
elif [ "$PLAN" = run15 ]; then
    nth 1 train_sd15_unet_512 280 200 --batch-512 64 --no-peer
    nth 2 train_sd15_unet_512 480 330 --batch-512 128 --activation-checkpointing --no-peer
elif [ "$PLAN" = run14 ]; then
    nth 1 unet_step_sd15_512_b1_cfg 200 130 --levers "$OUT/levers.jsonl" --compiled-levers-only --no-peer \
        --lever-names "the fast path, again" "cudnn.benchmark" --budget-s 100000
    nth 2 vae_encode_256 150 60 --cudnn-heuristics
    nth 3 txt2img_sd15_512_50steps_b1 250 170 --cudnn-heuristics
elif [ "$PLAN" = run13 ]; then
    nth 1 unet_step_sd15_512_b1_cfg 560 200 --levers "$OUT/levers.jsonl" --compiled-levers-only --no-peer \
        --lever-names "the fast path, again" "prefers cuDNN" "programmatic dependent" "combo kernels" \
        "default + cuDNN" "sums (ldm" --budget-s 100000
    nth 2 txt2img_sd15_512_50steps_b1 300 200
    nth 3 txt2img_sd15_512_50steps_b1 300 200 --sdpa cudnn
elif [ "$PLAN" = run12 ]; then
    nth 1 unet_step_sd15_512_b1_cfg 300 200 --levers "$OUT/levers.jsonl" --compiled-levers-only --no-peer \
        --lever-names "default (inductor kernels" "the fast path, again" "sums (ldm" --budget-s 100000
    nth 2 txt2img_sd15_512_50steps_b1 300 200
elif [ "$PLAN" = run11 ]; then
    # 1: the levers in COMPILED_LEVERS' order: compile default profiled, the fast path, the kernel, its profile
    nth 1 unet_step_sd15_512_b1_cfg 580 300 --levers "$OUT/levers.jsonl" --compiled-levers-only --no-peer \
        --lever-names "default (inductor kernels" "the fast path, again" "Triton GroupNorm" --budget-s 100000
    nth 2 train_sd15_unet_512 480 300 --fp8 --no-peer
elif [ "$PLAN" = run10 ]; then
    # 1: the peer's reduce-overhead ~60 s; its max-autotune with run 8's cached shapes ~220-300 s; ours without
    # prologue fusion ~220-300 s (bench.py skips, with a line saying so, what its --budget-s cannot hold)
    nth 1 unet_step_sd15_512_b1_cfg 580 300 --levers "$OUT/levers.jsonl" --compiled-levers-only \
        --lever-names "peer:" "without prologue fusion"
    nth 2 train_sd15_unet_512 480 300 --fp8 --no-peer
elif [ "$PLAN" = run9 ]; then
    # 1: the fast path ~60 s; max-autotune with every shape cached ~290 s of compile (run 8's third call: 387 s
    # with 8 shapes left to tune)
    nth 1 unet_step_sd15_512_b1_cfg 580 420 --levers "$OUT/levers.jsonl" --compiled-levers-only \
        --lever-names "the fast path, again" "max-autotune (autotuned products" --budget-s 100000
    # 2: compile default ~90 s, then the autotuned choices again without CUDA graphs (a new graph: ~300 s)
    nth 2 unet_step_sd15_512_b1_cfg 580 400 --levers "$OUT/levers.jsonl" --compiled-levers-only \
        --lever-names "GPU time by kernel kind" --budget-s 100000
    nth 3 train_sd15_unet_512 480 300 --fp8 --no-peer
elif [ "$PLAN" = run8 ]; then
    # 1: the whole window if it needs it (run 7: ~17 s per tuned shape, 34 shapes in 9 minutes); the last
    # --budget-s given wins over step's own, so bench.py starts the lever whatever its estimate
    nth 1 unet_step_sd15_512_b1_cfg 600 80 --levers "$OUT/levers.jsonl" --compiled-levers-only \
        --lever-names max-autotune --budget-s 100000
    nth 2 unet_step_sd15_512_b1_cfg 120 80 --levers "$OUT/levers.jsonl" --compiled-levers-only \
        --lever-names "the fast path, again"
    nth 3 train_sd15_unet_512 480 300 --fp8 --no-peer
elif [ "$PLAN" = run7 ]; then
    nth 1 eval_generate_sd15_512_25steps 400 300 --eval-batches 16
    # 2: eager ~10 s, then the encoder compiled on each side (~40-60 s each)
    nth 2 vae_encode_256 220 100
    nth 3 unet_step_sd15_512_b1_cfg 560 80 --levers "$OUT/levers.jsonl" --compiled-levers-only \
        --lever-names "graphs alone" mask max-autotune
    nth 4 train_sd15_unet_512 480 300 --fp8 --no-peer
elif [ "$PLAN" = run6 ]; then
    # 1: eager ~35 s, ours compiled ~80 s, the peer compiled ~150-170 s (run 5: ours' compile 59 s at batch 16)
    nth 1 eval_generate_sd15_512_25steps 400 300 --eval-batches 16
    # 2: eager ~40 s, then the FP8 step's compile (> 215 s in run 5)
    nth 2 train_sd15_unet_512 480 300 --fp8 --no-peer
    # 3: CUDA graphs alone ~60 s, the mask kept ~90 s, max-autotune what is left (it needs ~480 s)
    nth 3 unet_step_sd15_512_b1_cfg 560 80 --levers "$OUT/levers.jsonl" --compiled-levers-only \
        --lever-names "graphs alone" mask max-autotune
elif [ "$PLAN" = run5 ]; then
    # 1: each lever compiles the U-Net once (~40-60 s; tuning and max-autotune longer) and is skipped, with a
    # line saying so, when the step's --budget-s cannot hold it
    nth 1 unet_step_sd15_512_b1_cfg 560 120 --levers "$OUT/levers.jsonl" --compiled-levers-only
    # 2: eager ~40 s, ours' compile ~130 s; the peer's compile (> 125 s) only if the limit holds it
    nth 2 train_sd15_unet_256 300 200 --batch-256 128
    # 3: ours only, eager then compiled (~130 s)
    nth 3 train_sd15_unet_512 260 200 --fp8 --no-peer
    nth 4 eval_generate_sd15_512_25steps 540 250
else
    # 1: eager ~40 s, ours' compile ~130 s (126 s at 512 px in run 3), the peer's > 125 s: its rows by ~200 s
    nth 1 train_sd15_unet_256 500 200
    # 2: the eager pass ~55 s (run 3), then ~150 s per side and batch size compiled (bench.py skips what its
    # --budget-s cannot hold; ours first, largest batch first)
    nth 2 eval_generate_sd15_512_25steps 540 250
    # 3: ours' compile 126 s and the peer's (> 125 s, killed at run 3's 300 s limit) in one 420 s limit
    nth 3 train_sd15_unet_512 420 360 --train-both-compiled
    # 4: CUDA graphs alone ~60 s, compile default and reduce-overhead with the mask ~150 s each
    nth 4 unet_step_sd15_512_b1_cfg 400 80 --levers "$OUT/levers.jsonl" --compiled-levers-only
fi
log "done: $(cat "$RESULTS" 2>/dev/null | wc -l) rows in $RESULTS, $(cat "$OUT/levers.jsonl" 2>/dev/null | wc -l) levers"
