#!/usr/bin/env bash
# Start a single-node Slurm cluster (munged + slurmctld + slurmd) on this machine, for CI.
#
# Idempotent: installs the Debian packages only if they are missing, and returns at once
# when the cluster is already up with the same configuration. Works from any directory.
# Run as root. Facts behind the choices below: shared/research/slurm-on-one-machine.md.
#
#   bash scripts/ci/start-slurm.sh     # 8-13 s from nothing, 3 s if installed, 0.1 s if up
#
# Environment:
#   SLURM_CI_DIR         state, spool, pid files and logs      (default /tmp/slurm-ci)
#   SLURM_CI_CPUS        CPUs the node advertises; more than the hardware is fine, so that
#                        several 1-CPU jobs run at once on 2 cores. Empty: the hardware's.
#                        (default 8)
#   SLURM_CI_TIMEOUT     seconds to wait for the node and the probe job  (default 60)
#   SLURM_CI_KEEP_STATE  1: keep the old job queue instead of `slurmctld -c`
#
# Stop it with scripts/ci/stop-slurm.sh. Logs: $SLURM_CI_DIR/log/.
set -euo pipefail

SLURM_CI_DIR=${SLURM_CI_DIR:-/tmp/slurm-ci}
SLURM_CI_CPUS=${SLURM_CI_CPUS-8}
SLURM_CI_TIMEOUT=${SLURM_CI_TIMEOUT:-60}
case "$SLURM_CI_TIMEOUT" in '' | *[!0-9]*) echo "start-slurm: SLURM_CI_TIMEOUT must be whole seconds" >&2; exit 1 ;; esac
SLURM_CONF=/etc/slurm/slurm.conf
MUNGE_PIDFILE=/run/munge/munged.pid
PACKAGES=(slurm-wlm slurm-wlm-torque munge)

t_start=$(date +%s.%N)
log() { printf 'start-slurm: %s\n' "$*" >&2; }
elapsed() { awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }'; }

show_logs() {
    local f
    for f in "$SLURM_CI_DIR/log/slurmctld.log" "$SLURM_CI_DIR/log/slurmd.log" \
        /var/log/munge/munged.log; do
        if [ -f "$f" ]; then
            printf '\n----- last lines of %s -----\n' "$f" >&2
            tail -n 25 "$f" >&2
        fi
    done
}

die() {
    log "ERROR: $*"
    show_logs
    exit 1
}

# True if the pid file names a live process whose comm is $2. A zombie (state Z) counts as
# dead: PID 1 on this machine reaps orphans only after 1-3 s.
alive() {
    local pidfile=$1 comm=$2 pid stat
    [ -r "$pidfile" ] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [ -n "$pid" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}

# Poll every 0.1 s until "$@" succeeds; give up after SLURM_CI_TIMEOUT seconds.
poll() {
    local what=$1
    shift
    local deadline=$((${EPOCHREALTIME/./} + SLURM_CI_TIMEOUT * 1000000))
    until "$@"; do
        if [ "${EPOCHREALTIME/./}" -ge "$deadline" ]; then
            [ -z "${SLURM_CI_NODE_HINT:-}" ] || what+=" (sinfo says: '$(node_state)')"
            die "timed out after ${SLURM_CI_TIMEOUT}s waiting for $what"
        fi
        sleep 0.1
    done
}

[ "$(id -u)" -eq 0 ] || { log "ERROR: run as root (it installs packages and starts daemons)"; exit 1; }

# ---- install ---------------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    # There is no init system that could run the services; stop the maintainer scripts from
    # trying. Docker-style images ship this file already; otherwise add one for the install.
    temp_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        temp_policy=1
    fi
    install -d -m 0755 "$SLURM_CI_DIR/log"
    rc=0
    {
        # Lock timeout: another apt run on the same machine waits instead of failing.
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install \
                -y -qq --no-install-recommends "${PACKAGES[@]}"
    } >"$SLURM_CI_DIR/log/apt.log" 2>&1 || rc=$?
    [ -z "$temp_policy" ] || rm -f /usr/sbin/policy-rc.d
    [ "$rc" -eq 0 ] || { tail -n 30 "$SLURM_CI_DIR/log/apt.log" >&2; die "apt-get failed (exit $rc)"; }
    log "installed in $(elapsed)s"
fi

# ---- munge -----------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! alive "$MUNGE_PIDFILE" munged || ! munge_ok; then
    install -d -o munge -g munge -m 0755 /run/munge
    # --force takes over a socket left behind by a munged that was killed.
    runuser -u munge -- /usr/sbin/munged --force
    poll "munged (munge -n | unmunge)" munge_ok
fi

# ---- slurm.conf --------------------------------------------------------------------------
# The node line comes from `slurmd -C` on every start: a CPUs= or RealMemory= above what the
# hardware has drains the node, unless SlurmdParameters=config_overrides is set.
hw=$(slurmd -C 2>/dev/null) || die "'slurmd -C' failed"
hw=${hw%%$'\n'*}
case "$hw" in NodeName=*) ;; *) die "unexpected output of 'slurmd -C': $hw" ;; esac
node=$(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' <<<"$hw")
mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
if [ -n "$SLURM_CI_CPUS" ]; then
    case "$SLURM_CI_CPUS" in *[!0-9]* | 0) die "SLURM_CI_CPUS must be a positive integer or empty" ;; esac
    cpus=$SLURM_CI_CPUS
    overrides=SlurmdParameters=config_overrides
    node_line="NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN"
else
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    overrides=
    node_line="${hw/NodeName=$node /NodeName=$node NodeAddr=127.0.0.1 } State=UNKNOWN"
fi
# A job without --mem gets DefMemPerCPU; without a default it would take the whole node's
# memory and jobs would run one at a time. Never more than the node can give every CPU.
def_mem=$((mem / cpus < 512 ? mem / cpus : 512))

new_conf=$(
    cat <<CONF
# Generated by scripts/ci/start-slurm.sh - single-node CI cluster, no accounting database.
ClusterName=ci
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$SLURM_CI_DIR/state
SlurmdSpoolDir=$SLURM_CI_DIR/spool
SlurmctldPidFile=$SLURM_CI_DIR/run/slurmctld.pid
SlurmdPidFile=$SLURM_CI_DIR/run/slurmd.pid
SlurmctldLogFile=$SLURM_CI_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_CI_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$def_mem
ReturnToService=2
KillWait=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$SLURM_CI_DIR/log/jobcomp.log
$overrides

$node_line
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
)

ctld_pid=$SLURM_CI_DIR/run/slurmctld.pid
slurmd_pid=$SLURM_CI_DIR/run/slurmd.pid
node_state() { sinfo -h -n "$node" -o %T 2>/dev/null | head -n 1; }
node_ready() { case "$(node_state)" in idle | mixed | allocated) return 0 ;; esac; return 1; }

same_conf=
[ -f "$SLURM_CONF" ] && [ "$(cat "$SLURM_CONF")" = "$new_conf" ] && same_conf=1

# ---- already running? -------------------------------------------------------------------
if [ -n "$same_conf" ] && alive "$ctld_pid" slurmctld && alive "$slurmd_pid" slurmd && node_ready; then
    log "already running ($node: $(node_state), ${cpus} CPUs), checked in $(elapsed)s"
    exit 0
fi
if [ -z "$same_conf" ] && { alive "$ctld_pid" slurmctld || alive "$slurmd_pid" slurmd; }; then
    log "slurm.conf changed: restarting the running daemons (their jobs are cancelled)"
    bash "$(dirname "$(readlink -f "$0")")/stop-slurm.sh" --keep-munge
fi

# ---- start -------------------------------------------------------------------------------
install -d -m 0755 "$SLURM_CI_DIR"/{state,spool,run,log} /etc/slurm
printf '%s\n' "$new_conf" >"$SLURM_CONF"

t_daemons=$(date +%s.%N)
if ! alive "$ctld_pid" slurmctld; then
    if [ "${SLURM_CI_KEEP_STATE:-0}" = 1 ]; then slurmctld; else slurmctld -c; fi
fi
alive "$slurmd_pid" slurmd || slurmd
ctld_up() { scontrol ping >/dev/null 2>&1; }
poll "slurmctld to answer" ctld_up
SLURM_CI_NODE_HINT=1 poll "node $node to be idle" node_ready

# An idle node does not run jobs before slurmctld's first scheduling pass (about 3 s after it
# starts), so wait for a probe job to finish. `sbatch --wait` polls too slowly (up to 10 s).
probe=$(sbatch --parsable --job-name=ci-probe --chdir="$SLURM_CI_DIR" --output=/dev/null \
    --time=1 --wrap=true) || die "sbatch of the probe job failed"
probe=${probe%%;*}
probe_state() { scontrol show job "$probe" -o 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'; }
probe_done() {
    local s
    s=$(probe_state)
    case "$s" in
    COMPLETED) return 0 ;;
    FAILED | CANCELLED | TIMEOUT | NODE_FAIL | BOOT_FAIL | OUT_OF_MEMORY | DEADLINE | PREEMPTED)
        die "probe job $probe ended in state $s" ;;
    esac
    return 1
}
poll "probe job $probe to complete" probe_done

log "up: node $node idle, ${cpus} CPUs; daemons+probe $(awk -v a="$t_daemons" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')s, total $(elapsed)s"
