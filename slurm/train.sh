#!/usr/bin/env bash
# One training run on 1..N GPUs on one or several nodes: srun starts one torchrun per node, which
# rendezvous on the first node and start one process per GPU (DDP, or FSDP2 with --fsdp).
#
#   sbatch --nodes=2 --gpus-per-node=8 --time=12:00:00 slurm/train.sh --preset gpt2-medium --run-name m1
#   sbatch slurm/train.sh --preset tinystories            # one node, one GPU
#
# Arguments go to python -m train. The job's time limit becomes the trainer's time budget, and the
# trainer checkpoints on USR1 (120 s before the limit) and is requeued to resume.
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
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$GPUS_PER_NODE" -ge 1 ] 2>/dev/null || GPUS_PER_NODE=1
NNODES=${SLURM_NNODES:-1}
MASTER=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -1)
MASTER=${MASTER:-localhost}
PORT=${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}
read -r -a budget <<<"$(time_budget_args)"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
run_forwarding_signals srun --ntasks-per-node=1 --kill-on-bad-exit=1 "$PY" -m torch.distributed.run \
    --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER:$PORT" --rdzv-id="${SLURM_JOB_ID:-local}" \
    -m train "${budget[@]}" --quiet "$@"
code=$CHILD_EXIT
echo "trainer exit code $code"
if [ "$code" = 3 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "requeueing $SLURM_JOB_ID to resume from its checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$code"
