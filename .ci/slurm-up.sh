#!/usr/bin/env bash
# Install and start a real two-node Slurm cluster on this one machine, for tests/slurm/test_slurm.py.
#
# Debian's slurm-wlm (22.05) + munge. One slurmctld and two slurmd daemons ("virtual nodes" n1 and n2, one CPU each,
# both on 127.0.0.1 with their own ports, spool, pid and log files), so `srun -N 2` runs one task on each node.
# Idempotent: when the daemons run and both nodes answer, it only rewrites slurm.conf if it changed (then
# `scontrol reconfigure`). Needs root. Exits non-zero with diagnostics when the
# cluster does not come up.
#
# Env: PHI4_SLURM_DIR (default /tmp/phi4-slurm) holds state, spool, pids and logs.
set -euo pipefail

BASE="${PHI4_SLURM_DIR:-/tmp/phi4-slurm}"
CONF=/etc/slurm/slurm.conf
HOST="$(hostname -s)"

log() { echo "[slurm-up] $*"; }

diagnostics() {
    echo "[slurm-up] ---- diagnostics ----"
    sinfo -N -l 2>&1 || true
    scontrol ping 2>&1 || true
    ps -eo pid,user,args | grep -E '[m]unged|[s]lurmctld|[s]lurmd' || true
    for f in "$BASE"/log/*.log; do
        [ -f "$f" ] && { echo "--- tail $f"; tail -n 30 "$f"; }
    done
    return 0
}

# Both nodes registered and usable (idle, allocated, mixed or completing; not down, drained or unknown).
nodes_up() {
    local states
    states="$(sinfo -h -N -n n1,n2 -o '%N %t' 2>/dev/null | sort -u)" || return 1
    [ "$(echo "$states" | grep -cE '^n[12] (idle|alloc|mix|comp)$')" -eq 2 ]
}

[ "$(id -u)" -eq 0 ] || { echo "[slurm-up] must run as root" >&2; exit 1; }

# ---- packages ------------------------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
    || ! command -v sbatch >/dev/null; then
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# ---- munge ---------------------------------------------------------------------------------------------------------
mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
chmod 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating a munge key"
    mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 1 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    munge -n | unmunge >/dev/null || { echo "[slurm-up] munged does not answer" >&2; exit 1; }
fi

# ---- slurm.conf ----------------------------------------------------------------------------------------------------
mkdir -p "$BASE"/{state,log,run,spool/n1,spool/n2} /etc/slurm
cat > "$CONF.tmp" <<EOF
# Written by .ci/slurm-up.sh: a two-node test cluster on one machine (Slurm 22.05).
ClusterName=phi4ci
SlurmctldHost=$HOST
AuthType=auth/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=10
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
ReturnToService=2
SlurmdParameters=config_overrides
# Quick turnaround for tests: schedule pending (requeued, dependent) jobs every few seconds.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MinJobAge=600
KillWait=30
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=120
NodeName=n1 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=6818 CPUs=1 State=UNKNOWN
NodeName=n2 NodeHostname=$HOST NodeAddr=127.0.0.1 Port=6819 CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$CONF.tmp" "$CONF"; then
    mv "$CONF.tmp" "$CONF"
    CONF_CHANGED=1
else
    rm -f "$CONF.tmp"
    CONF_CHANGED=0
fi

# ---- daemons -------------------------------------------------------------------------------------------------------
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if pid_alive "$BASE/run/slurmctld.pid"; then
    if [ "$CONF_CHANGED" = 1 ]; then log "slurm.conf changed: reconfiguring"; scontrol reconfigure || true; fi
    nodes_up && { log "cluster already up"; sinfo -N; exit 0; }
else
    log "starting slurmctld"
    slurmctld -i
fi
for _ in $(seq 1 30); do scontrol ping >/dev/null 2>&1 && break; sleep 1; done
scontrol ping >/dev/null 2>&1 || { echo "[slurm-up] slurmctld does not answer" >&2; diagnostics; exit 1; }

for node in n1 n2; do
    if ! pid_alive "$BASE/run/slurmd-$node.pid"; then
        log "starting slurmd -N $node"
        slurmd -N "$node"
    fi
done

# Nodes left down by an earlier unclean stop come back here (ReturnToService=2 covers most cases by itself).
for _ in $(seq 1 60); do
    nodes_up && break
    if sinfo -h -N -n n1,n2 -o '%t' 2>/dev/null | grep -qE 'down|drain|fail'; then
        scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true
    fi
    sleep 1
done
if ! nodes_up; then
    echo "[slurm-up] nodes n1, n2 did not become idle" >&2
    diagnostics
    exit 1
fi
log "cluster up"
sinfo -N
