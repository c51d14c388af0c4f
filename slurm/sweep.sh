#!/usr/bin/env bash
# A sweep as a Slurm job array: one array task per configuration of a sweep file.
#
#   sbatch [--partition P] [--time 02:00:00] [--gres gpu:1] slurm/sweep.sh slurm/sweeps/lr.toml
#
# Submitted without --array, the script works out the array from the grid (0-(N-1)%K, K the sweep's
# max_concurrent) and resubmits itself as that array, forwarding partition, time limit, GPUs and CPUs.
# Each task decodes SLURM_ARRAY_TASK_ID into its configuration, names its run from the varied values
# and runs python -m train under srun with the job's remaining time as the trainer's time budget.
# Before the time limit (--signal=USR1@120) the trainer checkpoints and exits 3; the task then
# requeues itself and, restarted, resumes from its checkpoint. On SIGTERM (scancel, or preemption
# with PreemptMode=REQUEUE, where Slurm requeues by itself) it checkpoints and does not requeue.
#
#SBATCH --job-name=fastlm-sweep
#SBATCH --output=logs/%x_%A_%a.out
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --time=01:00:00
#SBATCH --cpus-per-task=1
set -uo pipefail
SWEEP=${1:?usage: sbatch slurm/sweep.sh SWEEP_FILE [extra python -m train flags]}
shift
cd "${SLURM_SUBMIT_DIR:-$(pwd)}"
. slurm/lib.sh

if [ -z "${SLURM_ARRAY_TASK_ID:-}" ]; then
    # Not an array yet: submit the array this sweep needs, with this job's resources.
    ARRAY=$("$PY" -m train.sweep array "$SWEEP") || exit 1
    opts=(--array="$ARRAY" --job-name="${SLURM_JOB_NAME:-fastlm-sweep}")
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        info=$(scontrol show job -o "$SLURM_JOB_ID")
        part=$(grep -oP 'Partition=\K\S+' <<<"$info" || true)
        tlim=$(grep -oP 'TimeLimit=\K\S+' <<<"$info" || true)
        gres=$(grep -oP 'TresPerNode=\K\S+' <<<"$info" | sed 's/^gres[:/]//' || true)
        [ -n "$part" ] && opts+=(--partition="$part")
        [ -n "$tlim" ] && [ "$tlim" != UNLIMITED ] && opts+=(--time="$tlim")
        [ -n "$gres" ] && [ "$gres" != "(null)" ] && opts+=(--gres="$gres")
        [ -n "${SLURM_CPUS_PER_TASK:-}" ] && opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    fi
    mkdir -p logs
    SCRIPT="$(realpath "${BASH_SOURCE[0]}" 2>/dev/null)"
    [ -f "slurm/sweep.sh" ] && SCRIPT="slurm/sweep.sh"
    exec sbatch "${opts[@]}" "$SCRIPT" "$SWEEP" "$@"
fi

read -r -a budget <<<"$(time_budget_args)"

mapfile -t ARGS < <("$PY" - "$SWEEP" "$SLURM_ARRAY_TASK_ID" <<'PY'
import sys
from train.sweep import load_sweep, train_args
for a in train_args(load_sweep(sys.argv[1]), int(sys.argv[2])):
    print(a)
PY
)
[ "${#ARGS[@]}" -gt 0 ] || { echo "could not decode task $SLURM_ARRAY_TASK_ID of $SWEEP" >&2; exit 1; }
echo "task ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} (restart ${SLURM_RESTART_COUNT:-0}): python -m train ${ARGS[*]} ${budget[*]} $*"

# One intra-op thread per allocated CPU: oversubscribed OpenMP threads spin against each other.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

# Signals to the batch shell (--signal=B:USR1@..., scancel -b) are passed on to the trainer.
run_forwarding_signals srun --ntasks=1 --kill-on-bad-exit=1 "$PY" -m train "${ARGS[@]}" "${budget[@]}" --quiet "$@"
code=$CHILD_EXIT
run_dir=$(printf '%s\n' "${ARGS[@]}" | awk 'p=="--out-dir"{o=$0} p=="--run-name"{n=$0} {p=$0} END{print o"/"n}')
status=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['status'])" "$run_dir/summary.json" 2>/dev/null || echo unknown)
echo "trainer exit code $code, status: $status"
# USR1 (the time-limit warning, or a manual scancel --signal=USR1) and a reached time budget mean
# "continue later": requeue. SIGTERM means scancel or preemption: Slurm decides, we do not requeue.
if [ "$status" = "interrupted by SIGUSR1" ] || [ "$status" = "time budget reached" ]; then
    echo "requeueing ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} to resume from its checkpoint"
    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    exit 0
fi
exit "$code"
