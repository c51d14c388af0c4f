#!/usr/bin/env bash
# A sweep as a Slurm job array: one array task per configuration of a sweep file.
#
#   sbatch [--partition P] [--time 02:00:00] [--gres gpu:1] slurm/sweep.sh slurm/sweeps/lr.toml
#
# Submitted without --array, the script works out the array from the grid (0-(N-1)%K, K the sweep's
# max_concurrent) and resubmits itself as that array, forwarding partition, time limit, GPUs and CPUs.
# The submitting job logs to logs/%x_%j.out, the array tasks to logs/%x_%A_%a.out (create logs/ first).
# Each task decodes SLURM_ARRAY_TASK_ID into its configuration, names its run from the varied values
# and runs python -m train under srun with the job's remaining time as the trainer's time budget.
# Outcomes are handled as in train.sh (slurm/lib.sh finish_job): at the budget, or on USR1 (120 s
# before the limit, or scancel --signal=USR1) the trainer checkpoints and the task requeues itself
# and, restarted, resumes from its checkpoint. On SIGTERM (scancel, or preemption with
# PreemptMode=REQUEUE, where Slurm requeues by itself) it checkpoints and does not requeue.
#
#SBATCH --job-name=fastlm-sweep
#SBATCH --output=logs/%x_%j.out
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
    opts=(--array="$ARRAY" --job-name="${SLURM_JOB_NAME:-fastlm-sweep}" --output="logs/%x_%A_%a.out")
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

START=$(date +%s)
read -r -a budget <<<"$(time_budget_args)"

mapfile -t ARGS < <("$PY" - "$SWEEP" "$SLURM_ARRAY_TASK_ID" <<'PY'
import sys
from train.sweep import load_sweep, train_args
for a in train_args(load_sweep(sys.argv[1]), int(sys.argv[2])):
    print(a)
PY
)
[ "${#ARGS[@]}" -gt 0 ] || { echo "could not decode task $SLURM_ARRAY_TASK_ID of $SWEEP" >&2; exit 1; }
read -r RUN_DIR _ < <(run_dir_of unnamed "${ARGS[@]}" "$@")
[ -n "$RUN_DIR" ] || { "$PY" -m train "${ARGS[@]}" "$@" --print-config >/dev/null; exit $?; }  # its one-line error
# From the allocation, not the submitting shell (sbatch exports its environment).
export OMP_NUM_THREADS=$(threads_per_process 1)
echo "task ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} = job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}, started $(date -d @"$START" '+%F %T'))," \
    "$OMP_NUM_THREADS thread(s): python -m train ${ARGS[*]} ${budget[*]} $* -> $RUN_DIR"

# Slurm signals (USR1 before the limit, TERM on scancel) reach the trainer in the step directly;
# those sent to the batch shell only (--signal=B:..., scancel --batch) are passed on.
run_forwarding_signals srun --ntasks=1 --kill-on-bad-exit=1 "$PY" -m train "${ARGS[@]}" "${budget[@]}" "$@"
finish_job "$RUN_DIR" "$START" "$CHILD_EXIT"
