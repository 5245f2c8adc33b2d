#!/usr/bin/env bash
# The whole pipeline on a laptop, offline: prepare the embedded corpus, train the tiny `debug` model (validation,
# HellaSwag on the committed sample, samples and checkpoints along the way), evaluate it, sample from it and plot
# its curves. Runs on 2 CPU cores in a few minutes; uses a GPU or Apple MPS when present.
#
# Environment (all optional):
#   DEVICE=cpu|cuda|mps   force a device (default: the best available)
#   RUN_DIR=path          run directory (default: a new temp_data/runs/debug-<time>)
#   RESUME=1              continue the run in RUN_DIR (required then) from its newest checkpoint
#   DATA_DIR=path         prepared data (default temp_data/data/embedded; reused when complete)
#   TRAIN_ARGS="..."      extra train.py flags, e.g. "--max-steps 100"; quotes group words as on a command line:
#                         "--sample-prompts 'Once upon a time'"
#   TRACKER=none          watch the run live: tensorboard, wandb or tensorboard,wandb (pip install the package;
#                         W&B reads its own WANDB_* variables, e.g. WANDB_MODE=offline)
set -euo pipefail
cd "$(dirname "$0")"
start=$(date +%s)

case "${RESUME:-0}" in
  0|1) ;;
  *) echo "error: RESUME=${RESUME}: use RESUME=1 to continue the run in RUN_DIR, or 0 (the default) for a new run" >&2
     exit 2 ;;
esac
if [ "${RESUME:-0}" = 1 ] && [ -z "${RUN_DIR:-}" ]; then
  echo "error: RESUME=1 needs RUN_DIR=<the run to continue>, e.g. RUN_DIR=temp_data/runs/debug-20260101-120000" >&2
  exit 2
fi
source ./setup_env.sh requirements.txt
DATA_DIR=${DATA_DIR:-temp_data/data/embedded}
RUN_DIR=${RUN_DIR:-temp_data/runs/debug-$(date +%Y%m%d-%H%M%S)}
device_args=(); [ -n "${DEVICE:-}" ] && device_args=(--device "$DEVICE")
resume_args=(); [ "${RESUME:-0}" = 1 ] && resume_args=(--resume)
split_words extra_args TRAIN_ARGS
# Arrays are expanded as ${a[@]+"${a[@]}"}: macOS's bash 3.2 calls an empty "${a[@]}" unbound under set -u.

# shellcheck disable=SC2046
stage "prepare the embedded corpus -> $DATA_DIR" python data_prep.py --source embedded --out "$DATA_DIR" \
  $(replace_unfinished_data "$DATA_DIR")
stage "train the debug model -> $RUN_DIR" python train.py --config debug --data "$DATA_DIR" --out "$RUN_DIR" \
  --tracker "${TRACKER:-none}" \
  ${device_args[@]+"${device_args[@]}"} ${resume_args[@]+"${resume_args[@]}"} \
  ${extra_args[@]+"${extra_args[@]}"}
stage "HellaSwag (committed sample)" python hellaswag_eval.py --checkpoint "$RUN_DIR" \
  --data assets/hellaswag/hellaswag_val_head10.jsonl --out "$RUN_DIR/hellaswag.json" \
  ${device_args[@]+"${device_args[@]}"}
stage "samples (the three reference prompts)" python generate.py --checkpoint "$RUN_DIR" --max-new-tokens 32 \
  --temperature 0.8 --top-k 50 --seed 1337 ${device_args[@]+"${device_args[@]}"}
stage "plots" python plot_metrics.py "$RUN_DIR"

summary() {
  python - "$RUN_DIR" "$(( $(date +%s) - start ))" <<'PY'
import sys
from checkpoint import list_checkpoints
from plot_metrics import latest_values, read_metrics
run, seconds = sys.argv[1], int(sys.argv[2])
events = read_metrics(run)
latest, checkpoints = latest_values(events), list_checkpoints(run)
# step 0's, unless this run never evaluated it (TRAIN_ARGS with --eval-every 0 and a resume: maybe none at all)
first = next((e for e in events if e.get("val_loss") is not None), None)
print(f"run directory : {run}")
print(f"plots         : {run}/plots/ (training.png, loss.png, hellaswag.png)")
print(f"checkpoint    : {checkpoints[-1] if checkpoints else 'none'}")
print(f"val loss      : " + (f"{first['val_loss']:.4f} at step {first['step']} -> {latest['val_loss'][1]:.4f} at step "
                             f"{latest['val_loss'][0]}" if first else "not evaluated in this run's metrics"))
print(f"wall time     : {seconds // 60} min {seconds % 60} s")
PY
}
stage "summary" summary
