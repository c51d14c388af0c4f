#!/usr/bin/env bash
# A real one-node Slurm cluster on 127.0.0.1 (munged, slurmctld, slurmd) for tests and local use,
# with a generated configuration under DIR. Needs Debian's slurm-wlm and munge, run as root.
#
#   eval "$(bash slurm/local_cluster.sh start /tmp/slurm)"   # prints export SLURM_CONF=...
#   bash slurm/local_cluster.sh stop /tmp/slurm
set -euo pipefail
cmd=${1:?usage: local_cluster.sh start|stop DIR}
DIR=$(realpath -m "${2:?usage: local_cluster.sh start|stop DIR}")
CONF="$DIR/slurm.conf"
NODE=$(hostname -s)

stop() {
    for d in slurmd slurmctld; do
        if [ -f "$DIR/$d.pid" ]; then kill "$(cat "$DIR/$d.pid")" 2>/dev/null || true; fi
    done
    if [ -f "$DIR/munged.pid" ]; then kill "$(cat "$DIR/munged.pid")" 2>/dev/null || true; fi
    sleep 1
    rm -f "$DIR"/*.pid
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "usage: local_cluster.sh start|stop DIR" >&2; exit 2; }
for b in munged slurmctld slurmd sbatch; do
    command -v "$b" >/dev/null || { echo "missing $b: apt-get install slurm-wlm munge" >&2; exit 1; }
done
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge" "$DIR/log"
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS: the cores
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cat > "$CONF" <<CONF
ClusterName=fastlm-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Requeue latency. A requeued job may not start again before its old job credential expires
# (cred_expire: 120 s by default, 10 s here). Once that begin time passes no event wakes the
# scheduler: backfill runs only after a change to jobs or nodes, and the main loop only every
# sched_interval (60 s by default), so a restart took 50-60 s. sched_interval=2 starts it within
# about 12 s of the requeue (tests/test_slurm.py bounds it). A real cluster's delay is its own
# cred_expire plus up to its sched_interval.
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2,sched_min_interval=100000
MinJobAge=300
KillWait=5
InactiveLimit=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
# munge: a key of our own, a socket under DIR.
if [ ! -f "$DIR/munge/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge/munge.key"
fi
mkdir -p /run/munge
munged --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/seed" --force 2>/dev/null || munged --force
export SLURM_CONF="$CONF"
slurmctld -f "$CONF"
slurmd -f "$CONF" -N "$NODE"
for _ in $(seq 1 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed|alloc"; then
        echo "export SLURM_CONF=$CONF"
        exit 0
    fi
    sleep 0.5
done
echo "slurm did not come up; see $DIR/log" >&2
tail -5 "$DIR"/log/*.log >&2 || true
exit 1
