# Sourced by the device training scripts (tools/device_train_emoji.sh, tools/device_train_sr.sh): tools/train.py
# under a time limit. When the limit stops it, the newest checkpoint is exported (resumed at its own step, so nothing
# more trains); any other failure, or a failed export, returns non-zero with the reason in the log.
#   timed_train LIMIT STEPS LOG PRINT_EVERY RUN_DIR [tools/train.py arguments...]
# LOG_WITH: the training's log_with (the export logs nothing); EXPORT_ARGS: more overrides for the export only.
timed_train() {
  local limit=$1 steps=$2 log=$3 every=$4 run=$5 rc last step
  shift 5
  timeout "$limit" python3 tools/train.py "$@" --max-steps "$steps" log_with="${LOG_WITH:-none}" 2>&1 \
      | grep -v -i warn | tee "$log" | awk -v n="$every" 'NR % n == 1'
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ]; then  # 124: the time limit, handled below; anything else is a failure
    echo "error: tools/train.py exited $rc (not the time limit); see $log" | tee -a "$log"
    return "$rc"
  fi
  [ -f "$run/unet.safetensors" ] && return 0  # finished within the limit: exported by train.py itself
  last=$(ls "$run/checkpoints" 2>/dev/null | sort | tail -1)
  if [ -z "$last" ]; then  # stopped before the first checkpoint: nothing to export
    echo "error: no checkpoint in $run/checkpoints within the ${limit} s limit; lower checkpoint_every" | tee -a "$log"
    return 1
  fi
  step=$((10#${last#step-}))
  python3 tools/train.py "$@" --resume latest --max-steps "$step" log_with=none ${EXPORT_ARGS:-} 2>&1 \
      | tail -3 | tee -a "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "error: exporting $last failed" | tee -a "$log"; return 1; }
}
