#!/usr/bin/env bash
# A one-node Slurm cluster on 127.0.0.1 for the test suite (Debian's Slurm 22.05, no systemd,
# no cgroups, no accounting daemon). Usage:
#   tests/slurm/start-cluster.sh DIR    install (once, as root), configure under DIR, start
#   tests/slurm/start-cluster.sh DIR stop
# Then use it with SLURM_CONF=DIR/slurm.conf. Without slurmdbd, `sacct` cannot answer, so the
# workflow's test profile queries job status with squeue.
set -euo pipefail
DIR=$(realpath -m "${1:?usage: start-cluster.sh DIR [stop]}")
ACTION=${2:-start}

stop() {
    for pid in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munged.pid"; do
        [ -f "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
    done
    sleep 0.5
    for pid in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/munged.pid"; do
        [ -f "$pid" ] && kill -9 "$(cat "$pid")" 2>/dev/null || true
        rm -f "$pid"
    done
}
if [ "$ACTION" = stop ]; then
    stop
    MUNGE=$(cat "$DIR/munge_dir" 2>/dev/null || true)
    [ -n "$MUNGE" ] && rm -rf "$MUNGE" "$DIR/munge_dir"
    if [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$DIR/slurm.conf" ]; then
        rm -f /etc/slurm/slurm.conf
    fi
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "Slurm is not installed and this is not root" >&2; exit 2; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge \
        >"${TMPDIR:-/tmp}/rl4med-slurm-install.log" 2>&1 \
        || { echo "apt-get install of Slurm failed: ${TMPDIR:-/tmp}/rl4med-slurm-install.log" >&2; exit 2; }
fi
[ "$(id -u)" = 0 ] || { echo "starting slurmd needs root" >&2; exit 2; }

mkdir -p "$DIR/state" "$DIR/spool"
stop
# munge: its own key and socket, run as the munge user, in a folder of its own under /tmp (DIR
# may sit below folders the munge user cannot enter, e.g. pytest's 0700 temporary folders)
MUNGE=$(cat "$DIR/munge_dir" 2>/dev/null || true)
if [ -z "$MUNGE" ] || [ ! -d "$MUNGE" ]; then
    MUNGE=$(mktemp -d /tmp/rl4med-munge.XXXXXX)
    echo "$MUNGE" > "$DIR/munge_dir"
fi
chown munge: "$MUNGE"
chmod 700 "$MUNGE"
if [ ! -s "$MUNGE/munge.key" ]; then
    dd if=/dev/urandom of="$MUNGE/munge.key" bs=1024 count=1 status=none
fi
chown munge: "$MUNGE/munge.key"
chmod 400 "$MUNGE/munge.key"
SOCKET="$MUNGE/munge.socket"
runuser -u munge -- munged --key-file="$MUNGE/munge.key" --socket="$SOCKET" \
    --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log" \
    --seed-file="$MUNGE/munged.seed" --force
cp "$MUNGE/munged.pid" "$DIR/munged.pid"

CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
cat > "$DIR/slurm.conf" <<CONF
ClusterName=rl4med-test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCKET
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=600
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$DIR/slurm.conf"
# Job steps (srun inside a batch job) read the default path: point it at this cluster's file,
# unless a real configuration lives there.
if [ ! -e /etc/slurm/slurm.conf ] || [ -L /etc/slurm/slurm.conf ]; then
    mkdir -p /etc/slurm
    ln -sfn "$SLURM_CONF" /etc/slurm/slurm.conf
fi
slurmctld -i -f "$SLURM_CONF"
slurmd -N localhost -f "$SLURM_CONF"
for _ in $(seq 1 50); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
        echo "Slurm cluster up: SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.2
done
echo "Slurm did not come up; logs in $DIR" >&2
tail -5 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
exit 1
