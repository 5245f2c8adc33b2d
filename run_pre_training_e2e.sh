#!/usr/bin/env bash
# The full reference run on a GPU box: FineWeb-Edu sample-10BT -> LF_LLM-269M on every local GPU with torchrun,
# fault tolerant (a crashed worker group restarts from the last checkpoint; re-running the script resumes), then
# the final HellaSwag evaluation, samples and plots.
#
# Environment (all optional):
#   CONFIG=lf_llm_269m        train.py preset
#   DATA_DIR=temp_data/data/fineweb_edu_10bt   prepared data; preparation is skipped when its manifest is complete
#   RUN_DIR=temp_data/runs/lf_llm_269m         run directory; an existing run there is resumed
#   NPROC=<all GPUs>          processes (GPUs) on this node (default: `nvidia-smi -L` count, else torch's)
#   NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500   multi-node: run the script on every node
#   MAX_RESTARTS=3            torchrun restarts of the worker group after a failure
#   DATA_WORKERS=<all cores>  tokenizer processes for data preparation
#   HELLASWAG_DATA=           jsonl file; empty = the official validation split, downloaded once
#   TRAIN_ARGS="..."          extra train.py flags, e.g. "--micro-batch 8" for smaller GPUs; quotes group words
#                             as on a command line: "--sample-prompts 'Once upon a time'"
#   TRACKER=none              watch the run live: tensorboard, wandb or tensorboard,wandb (pip install the package;
#                             W&B reads its own WANDB_* variables, e.g. WANDB_MODE=offline)
#   SMOKE=1                   every stage on CPU in about a minute: embedded corpus, debug preset, 2 processes,
#                             8 tiny steps (TRAIN_ARGS overrides them)
set -euo pipefail
cd "$(dirname "$0")"

source ./setup_env.sh requirements.txt

if [ "${SMOKE:-0}" = 1 ]; then
  CONFIG=${CONFIG:-debug}
  DATA_DIR=${DATA_DIR:-temp_data/data/embedded}
  RUN_DIR=${RUN_DIR:-temp_data/runs/smoke}
  NPROC=${NPROC:-2}
  HELLASWAG_DATA=${HELLASWAG_DATA:-assets/hellaswag/hellaswag_val_head10.jsonl}
  TRAIN_ARGS=${TRAIN_ARGS:---max-steps 8 --micro-batch 2 --seq-len 64 --total-batch-tokens 256 --log-every 2 --eval-every 4 --val-tokens 1024 --final-val-tokens 2048 --ckpt-every 4}
  prepare=(python data_prep.py --source embedded --out "$DATA_DIR")
  device_args=(--device cpu)
else
  CONFIG=${CONFIG:-lf_llm_269m}
  DATA_DIR=${DATA_DIR:-temp_data/data/fineweb_edu_10bt}
  RUN_DIR=${RUN_DIR:-temp_data/runs/$CONFIG}
  if [ -z "${NPROC:-}" ]; then
    NPROC=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [ "$NPROC" -gt 0 ] || NPROC=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
  fi
  HELLASWAG_DATA=${HELLASWAG_DATA:-}
  prepare=(python data_prep.py --source hf --dataset HuggingFaceFW/fineweb-edu --name sample-10BT --split train
           --out "$DATA_DIR" --workers "${DATA_WORKERS:-$(nproc)}")
  device_args=()
fi
NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-3}
TRACKER=${TRACKER:-none}
split_words extra_args TRAIN_ARGS
# Arrays are expanded as ${a[@]+"${a[@]}"}: macOS's bash 3.2 calls an empty "${a[@]}" unbound under set -u.
hellaswag_args=(); train_hellaswag_args=()
if [ -n "$HELLASWAG_DATA" ]; then
  hellaswag_args=(--data "$HELLASWAG_DATA"); train_hellaswag_args=(--hellaswag-data "$HELLASWAG_DATA")
fi
echo "config $CONFIG | data $DATA_DIR | run $RUN_DIR | $NNODES node(s) x $NPROC processes | node rank $NODE_RANK"

# shellcheck disable=SC2046
stage "prepare data -> $DATA_DIR" "${prepare[@]}" $(replace_unfinished_data "$DATA_DIR")
if [ -z "$HELLASWAG_DATA" ]; then
  stage "download HellaSwag validation" python hellaswag_eval.py --download-only
fi
# --resume --allow-fresh-start: the first launch starts from scratch; a restart (torchrun's or a re-run of this
# script) continues from the newest checkpoint in RUN_DIR (on several nodes RUN_DIR must be on a shared filesystem).
# On SIGTERM (preemption) the workers checkpoint and exit 0, but torchrun itself then reports the signal as a failure:
# re-run the script to continue.
train_args=(train.py --config "$CONFIG" --data "$DATA_DIR" --out "$RUN_DIR" --resume --allow-fresh-start
            --tracker "$TRACKER" ${device_args[@]+"${device_args[@]}"}
            ${train_hellaswag_args[@]+"${train_hellaswag_args[@]}"} ${extra_args[@]+"${extra_args[@]}"})
# One process checks the configuration first: torchrun's restarts retry failures, but not a wrong setting.
stage "check the train.py configuration" python "${train_args[@]}" --check "$((NNODES * NPROC))"
stage "train $CONFIG on $NNODES x $NPROC processes" python -m torch.distributed.run \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" --max_restarts "$MAX_RESTARTS" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "lf-llm-$(basename "$RUN_DIR")" \
  "${train_args[@]}"
if [ "$NODE_RANK" != 0 ]; then exit 0; fi  # evaluation, samples and plots once, on the first node
stage "final HellaSwag" python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" hellaswag_eval.py \
  --checkpoint "$RUN_DIR" ${hellaswag_args[@]+"${hellaswag_args[@]}"} --out "$RUN_DIR/hellaswag.json" \
  ${device_args[@]+"${device_args[@]}"}
stage "samples (the three reference prompts)" python generate.py --checkpoint "$RUN_DIR" --max-new-tokens 64 \
  --temperature 0.8 --top-k 50 --seed 1337 ${device_args[@]+"${device_args[@]}"}
stage "plots" python plot_metrics.py "$RUN_DIR"
echo; echo "done: run directory $RUN_DIR (metrics.jsonl, train.log, checkpoints/, plots/, hellaswag.json)"
