#!/usr/bin/env bash
# Stop the single-node CI Slurm started by scripts/ci/start-slurm.sh. Idempotent.
#
#   bash scripts/ci/stop-slurm.sh [--keep-munge]
#
# Cancels every job first and waits for them: job steps (slurmstepd and the job's
# processes) outlive slurmd, so stopping the daemons alone would leave them running. Then
# stops slurmd, slurmctld and munged by their pid files, after checking /proc/PID/comm;
# it never kills by process name. Environment: SLURM_CI_DIR (default /tmp/slurm-ci), used
# only when /etc/slurm/slurm.conf does not name the pid files.
set -euo pipefail

SLURM_CI_DIR=${SLURM_CI_DIR:-/tmp/slurm-ci}
SLURM_CONF=/etc/slurm/slurm.conf
MUNGE_PIDFILE=/run/munge/munged.pid
keep_munge=
[ "${1:-}" = --keep-munge ] && keep_munge=1

log() { printf 'stop-slurm: %s\n' "$*" >&2; }

conf_value() {
    [ -r "$SLURM_CONF" ] && sed -n "s/^$1=//p" "$SLURM_CONF" | tail -n 1
    return 0
}
ctld_pidfile=$(conf_value SlurmctldPidFile)
slurmd_pidfile=$(conf_value SlurmdPidFile)
ctld_pidfile=${ctld_pidfile:-$SLURM_CI_DIR/run/slurmctld.pid}
slurmd_pidfile=${slurmd_pidfile:-$SLURM_CI_DIR/run/slurmd.pid}

# Prints the pid if the pid file names a live process whose comm is $2. A zombie (state Z)
# counts as dead: PID 1 on this machine reaps orphans only after 1-3 s.
live_pid() {
    local pidfile=$1 comm=$2 pid stat
    [ -r "$pidfile" ] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [ -n "$pid" ] || return 1
    pid_is "$pid" "$comm" || return 1
    echo "$pid"
}
pid_is() {
    local pid=$1 comm=$2 stat
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}

# SIGTERM, wait up to 10 s, then SIGKILL and wait up to 5 s more.
stop_daemon() {
    local name=$1 pidfile=$2 pid i
    pid=$(live_pid "$pidfile" "$name") || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        pid_is "$pid" "$name" || { log "stopped $name ($pid)"; rm -f "$pidfile"; return 0; }
        sleep 0.1
    done
    log "$name ($pid) ignored SIGTERM for 10 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        pid_is "$pid" "$name" || { rm -f "$pidfile"; return 0; }
        sleep 0.1
    done
    log "ERROR: $name ($pid) is still alive"
    return 1
}

active_jobs() {
    squeue -h -o %i -t PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING,RESIZING,REQUEUED,SIGNALING,STAGE_OUT 2>/dev/null
}

if live_pid "$ctld_pidfile" slurmctld >/dev/null && command -v squeue >/dev/null; then
    jobs=$(active_jobs || true)
    if [ -n "$jobs" ]; then
        # shellcheck disable=SC2086  # one job id per word
        scancel $jobs 2>/dev/null || true
        # KillWait=5: SIGKILL follows SIGTERM after at most 5 s, then the epilog.
        for ((i = 0; i < 300; i++)); do
            [ -n "$(active_jobs || true)" ] || break
            sleep 0.1
        done
        left=$(active_jobs || true)
        if [ -n "$left" ]; then
            log "WARNING: jobs still active after 30 s: $(echo $left)"
        else
            log "cancelled jobs: $(echo $jobs)"
        fi
    fi
fi

rc=0
stop_daemon slurmd "$slurmd_pidfile" || rc=1
stop_daemon slurmctld "$ctld_pidfile" || rc=1
[ -n "$keep_munge" ] || stop_daemon munged "$MUNGE_PIDFILE" || rc=1

# Report (never kill) job steps that survived, so that a leak is visible in the CI log.
for d in /proc/[0-9]*; do
    if [ "$(cat "$d/comm" 2>/dev/null)" = slurmstepd ] && pid_is "${d#/proc/}" slurmstepd; then
        log "WARNING: slurmstepd ${d#/proc/} is still running"
    fi
done
exit "$rc"
