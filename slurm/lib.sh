# Sourced by the Slurm job scripts (after cd to the submit directory).

# The Python to use: the repository's .venv when there is one.
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python

# "--time-budget SECONDS" for the trainer: the job's remaining time (squeue's %L: [D-]HH:MM:SS,
# MM:SS or SS) minus 150 s, so the final eval and checkpoint happen before USR1 (120 s) and the
# limit. Prints nothing when there is no limit.
time_budget_args() {
    local left d=0 h=0 m=0 s=0 a b c
    left=$(squeue -h -j "${SLURM_JOB_ID:-0}" -o %L 2>/dev/null | head -1)
    [[ "$left" =~ ^([0-9]+-)?[0-9]+(:[0-9]+){0,2}$ ]] || return 0
    if [[ $left == *-* ]]; then d=${left%%-*}; left=${left#*-}; fi
    IFS=: read -r a b c <<<"$left"
    if [ -n "$c" ]; then h=$a; m=$b; s=$c; elif [ -n "$b" ]; then m=$a; s=$b; else s=$a; fi
    local secs=$(( 10#$d * 86400 + 10#$h * 3600 + 10#$m * 60 + 10#$s - 150 ))
    [ "$secs" -gt 30 ] && echo "--time-budget $secs"
    return 0
}

# Run a command in the background, pass USR1/TERM sent to this shell on to it, and wait for it
# (wait returns early when a trapped signal arrives). Sets CHILD_EXIT to its exit code.
run_forwarding_signals() {
    "$@" &
    local child=$!
    trap "kill -USR1 $child 2>/dev/null" USR1 TERM
    while :; do
        wait "$child"; CHILD_EXIT=$?
        kill -0 "$child" 2>/dev/null || break
    done
    trap - USR1 TERM
}
