# Sourced by the Slurm job scripts (after cd to the submit directory): what train.sh and sweep.sh
# share, so that both act the same on every outcome of a run.

# The Python to use: the repository's .venv when there is one.
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python

# "--time-budget SECONDS" for the trainer: the job's remaining time (squeue's %L: [D-]HH:MM:SS,
# MM:SS or SS) minus FASTLM_TIME_RESERVE (150 s), so the final eval and checkpoint happen before
# USR1 (120 s) and the limit. The budget is this process's own time, so each allocation gets what
# it has left. Prints nothing when there is no limit, or under 10 s would be left.
time_budget_args() {
    local left d=0 h=0 m=0 s=0 a b c
    left=$(squeue -h -j "${SLURM_JOB_ID:-0}" -o %L 2>/dev/null | head -1)
    [[ "$left" =~ ^([0-9]+-)?[0-9]+(:[0-9]+){0,2}$ ]] || return 0
    if [[ $left == *-* ]]; then d=${left%%-*}; left=${left#*-}; fi
    IFS=: read -r a b c <<<"$left"
    if [ -n "$c" ]; then h=$a; m=$b; s=$c; elif [ -n "$b" ]; then m=$a; s=$b; else s=$a; fi
    local secs=$(( 10#$d * 86400 + 10#$h * 3600 + 10#$m * 60 + 10#$s - ${FASTLM_TIME_RESERVE:-150} ))
    [ "$secs" -ge 10 ] && echo "--time-budget $secs"
    return 0
}

# Intra-op threads for each of NPROCS training processes on this node: the CPUs Slurm allocated
# (--cpus-per-task, else the job's CPUs on the node, else the machine's cores) shared out, at
# least 1. More OpenMP threads than cores spin against each other (2 s/step instead of 80 ms).
threads_per_process() {
    local nprocs=${1:-1} cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}}
    cpus=${cpus%%(*}  # SLURM_CPUS_ON_NODE may read "4(x2)" on heterogeneous nodes
    local t=$(( cpus / (nprocs > 0 ? nprocs : 1) ))
    echo $(( t > 0 ? t : 1 ))
}

# The run directory python -m train ARGS... writes to (its resolved out_dir/run_name), or, when
# the arguments name no run, out_dir/DEFAULT_NAME and a second word "unnamed".
run_dir_of() {
    local default=$1; shift
    "$PY" -m train "$@" --print-config 2>/dev/null | "$PY" -c '
import json, os, sys
r = json.load(sys.stdin)["run"]
print(os.path.join(r["out_dir"], r["run_name"] or sys.argv[1]), "" if r["run_name"] else "unnamed")' "$default" 2>/dev/null
}

# Run a command in the background, pass USR1 and TERM sent to this shell (scancel --batch, or
# --signal=B:...) on to it as the same signal, and wait for it (wait returns early when a trapped
# signal arrives). Sets CHILD_EXIT to its exit code.
run_forwarding_signals() {
    "$@" &
    local child=$!
    trap "kill -USR1 $child 2>/dev/null" USR1
    trap "kill -TERM $child 2>/dev/null" TERM
    while :; do
        wait "$child"; CHILD_EXIT=$?
        kill -0 "$child" 2>/dev/null || break
    done
    trap - USR1 TERM
}

# After the run in RUN_DIR that started at epoch second START ended with exit code CODE: what the
# job does, the same in train.sh and sweep.sh. The run's summary.json (rank 0 writes it; torchrun
# reports any worker's non-zero exit as 1) says how it ended:
#   "interrupted by SIGUSR1", "time budget reached"  checkpointed, to be continued: requeue, exit 0
#   "interrupted by SIGTERM"/"SIGINT"               checkpointed; scancel or preemption: Slurm decides
#   "finished", "diverged", "failed"                the job ends with the trainer's exit code
# A summary older than START (the run died before writing one) counts as none: exit with CODE.
finish_job() {
    local run_dir=$1 start=$2 code=$3 status exit_code
    read -r exit_code status < <("$PY" - "$run_dir/summary.json" "$start" "$code" <<'PY'
import json, os, sys
from train.errors import STATUS_EXIT
path, start, code = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
try:
    fresh = os.stat(path).st_mtime >= start - 1
    status = json.load(open(path))["status"] if fresh else "none"
except (OSError, ValueError, KeyError):
    status = "none"
print(STATUS_EXIT.get(status, code), status)
PY
    )
    exit_code=${exit_code:-$code}
    echo "run $run_dir: exit code $code, status: ${status:-none}"
    if [ "$status" = "interrupted by SIGUSR1" ] || [ "$status" = "time budget reached" ]; then
        if [ -n "${SLURM_JOB_ID:-}" ]; then
            echo "requeueing job $SLURM_JOB_ID to resume from its checkpoint at $(date '+%F %T')"
            scontrol requeue "$SLURM_JOB_ID" && exit 0
        fi
    fi
    exit "$exit_code"
}
