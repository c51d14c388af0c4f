#!/usr/bin/env bash
# One training run on 1..N GPUs on one or several nodes: srun starts one torchrun per node, which
# rendezvous on the first node and start one process per GPU (DDP, or FSDP2 with --fsdp).
#
#   mkdir -p logs
#   sbatch --nodes=2 --gpus-per-node=8 --time=12:00:00 slurm/train.sh --preset gpt2-medium --run-name m1
#   sbatch slurm/train.sh --preset tinystories            # one node, one GPU
#
# Arguments go to python -m train (without --run-name the run is named after the job, so a requeued
# job resumes the same run). Processes per node: NPROC_PER_NODE, else the node's GPUs, else 1 (CPU
# runs use gloo). The job's remaining time becomes the trainer's --time-budget. At the budget, or on
# USR1 (Slurm sends it 120 s before the limit; scancel --signal=USR1 does too) the trainer
# checkpoints and the job requeues itself to resume; on SIGTERM (scancel, preemption) it checkpoints
# and Slurm decides; finished or diverged end the job with the trainer's exit code.
#
# Signals: Slurm signals every process of the step on every node. torchrun would die of USR1 (and
# on TERM kill its workers after 30 s), so each node's torchrun ignores both and the workers, which
# handle them, stop together at the same step; rank 0 checkpoints, then all exit.
#
#SBATCH --job-name=fastlm-train
#SBATCH --output=logs/%x_%j.out
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --time=01:00:00
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-$(pwd)}"
. slurm/lib.sh
START=$(date +%s)
GPUS=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
NPROC=${NPROC_PER_NODE:-$GPUS}
[ "$NPROC" -ge 1 ] 2>/dev/null || NPROC=1
NNODES=${SLURM_NNODES:-1}
MASTER=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -1)
MASTER=${MASTER:-localhost}
PORT=${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}
ARGS=("$@")
NAME="${SLURM_JOB_NAME:-train}-${SLURM_JOB_ID:-local}"
read -r RUN_DIR UNNAMED < <(run_dir_of "$NAME" "$@")
[ -n "$RUN_DIR" ] || { "$PY" -m train "$@" --print-config >/dev/null; exit $?; }  # its one-line error
[ -n "${UNNAMED:-}" ] && ARGS+=(--run-name "$NAME")
read -r -a budget <<<"$(time_budget_args)"
# From the allocation, not the submitting shell (sbatch exports its environment).
export OMP_NUM_THREADS=$(threads_per_process "$NPROC")
# torchrun leaves TERM to its workers (they checkpoint and exit; Slurm's KillWait is the backstop).
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
echo "job ${SLURM_JOB_ID:-local} (restart ${SLURM_RESTART_COUNT:-0}, started $(date -d @"$START" '+%F %T')) on $NNODES node(s) x $NPROC process(es)," \
    "$OMP_NUM_THREADS thread(s) each: python -m train ${ARGS[*]} ${budget[*]} -> $RUN_DIR"
# No --kill-on-bad-exit: a node whose workers stopped must not kill rank 0 while it checkpoints.
run_forwarding_signals srun --ntasks-per-node=1 --kill-on-bad-exit=0 --wait=120 \
    bash -c 'trap "" USR1 TERM; exec "$@"' torchrun-ignoring-usr1 \
    "$PY" -m torch.distributed.run \
    --nnodes="$NNODES" --nproc-per-node="$NPROC" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER:$PORT" --rdzv-id="${SLURM_JOB_ID:-local}" \
    -m train "${ARGS[@]}" "${budget[@]}"
finish_job "$RUN_DIR" "$START" "$CHILD_EXIT"
