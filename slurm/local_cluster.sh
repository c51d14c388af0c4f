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
CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cat > "$CONF" <<CONF
ClusterName=fastlm-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Job credentials live 10 s instead of 120 s: a requeued job may start again once its old
# credential has expired, so the requeue delay of this test cluster is about 10 s, not 2 minutes.
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
SchedulerParameters=bf_interval=1,sched_min_interval=100000
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
