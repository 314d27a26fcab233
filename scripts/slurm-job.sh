#!/usr/bin/env bash
# One Slurm job that runs a whole zdist computation: a broker, a worker on every node
# of the job (started with srun), and your Python script; then it stops everything.
#
# Edit the resources (sbatch reads lines that start with exactly '#SBATCH'):
#SBATCH -J zdist-job
#SBATCH -t 00:10:00
#SBATCH -N 1
#SBATCH --ntasks-per-node=1
#SBATCH -c 1
##SBATCH -p normal
##SBATCH -A myproject
##SBATCH --mem=16G
#
# Submit (sbatch passes the arguments after the script on to it):
#   sbatch scripts/slurm-job.sh analysis.py [ARGS...]
#
# Your script connects with the scheduler file that this job exports:
#   import os
#   from zdist import Client
#   client = Client(scheduler_file=os.environ["ZDIST_SCHEDULER_FILE"])
# The workers have registered before your script starts (see ZDIST_WAIT_WORKERS).
#
# Settings (environment; sbatch exports the submitting shell's environment):
#   ZDIST_SCRIPT          the Python script to run, when not given as the argument
#   ZDIST_PYTHON          the Python with zdist installed [default: python3 on PATH]
#   ZDIST_INTERFACE       network interface for broker and workers, e.g. ib0
#   ZDIST_WORKER_ARGS     extra zworker options per node, e.g. "--nworkers 4"
#                         [default: one worker process using the node's CPUs of the job]
#   ZDIST_WAIT_WORKERS    worker processes to wait for before the script starts
#                         [default: one per node; 0: do not wait]
#   ZDIST_WAIT_TIMEOUT    seconds to wait for them [default: 300]
#   ZDIST_SCHEDULER_FILE  where the broker writes its address and keys (mode 0600, in
#                         a 0700 directory); on a filesystem every node shares
#                         [default: $SLURM_SUBMIT_DIR/.zdist-job-$SLURM_JOB_ID/]
#
# srun starts one worker per node as a job step, so Slurm accounts for the workers and
# kills them with the job; --overlap lets that step share CPUs with this batch step.

set -euo pipefail

say() { printf 'slurm-job: %s\n' "$*" >&2; }

user_script=${1:-${ZDIST_SCRIPT:-}}
if [ -z "$user_script" ]; then
    say "usage: slurm-job.sh SCRIPT.py [ARGS...] (or set ZDIST_SCRIPT)"
    exit 2
fi
[ $# -gt 0 ] && shift
python=$(command -v "${ZDIST_PYTHON:-python3}") || {
    say "no Python at '${ZDIST_PYTHON:-python3}': set ZDIST_PYTHON or activate the environment"
    exit 2
}
if [ -z "${SLURM_JOB_ID:-}" ]; then
    say "not inside a Slurm job: submit this script with sbatch"
    exit 2
fi
workdir=${SLURM_SUBMIT_DIR:-$PWD}
cd "$workdir"
interface=${ZDIST_INTERFACE:-}
death_timeout=${ZDIST_DEATH_TIMEOUT:-60}
n_nodes=${SLURM_JOB_NUM_NODES:-1}
export ZDIST_N_NODES=$n_nodes
umask 077
if [ -z "${ZDIST_SCHEDULER_FILE:-}" ]; then
    ZDIST_SCHEDULER_FILE=$workdir/.zdist-job-$SLURM_JOB_ID/scheduler.json
fi
export ZDIST_SCHEDULER_FILE
state_dir=$(dirname "$ZDIST_SCHEDULER_FILE")
mkdir -p "$state_dir"
rm -f "$ZDIST_SCHEDULER_FILE" # a stale file would point the workers elsewhere

srun_pid=
broker_pid=
user_status=1

cleanup() {
    trap - EXIT INT TERM
    set +e
    if [ -n "$broker_pid" ] && [ -s "$ZDIST_SCHEDULER_FILE" ]; then
        # Ask every worker to hand back its work and exit (exit 0 ends the step).
        "$python" - "$ZDIST_SCHEDULER_FILE" <<'EOF' >/dev/null 2>&1
import sys
from zdist import Client, get_worker
with Client(scheduler_file=sys.argv[1], timeout=10) as client:
    client.run(lambda: get_worker().close_gracefully("the job script is done"))
EOF
    fi
    if [ -n "$srun_pid" ]; then
        local deadline=$((SECONDS + 30))
        while kill -0 "$srun_pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        # srun forwards SIGTERM to the workers.
        kill -0 "$srun_pid" 2>/dev/null && kill -TERM "$srun_pid" 2>/dev/null
        wait "$srun_pid" 2>/dev/null
    fi
    if [ -n "$broker_pid" ]; then
        kill -TERM "$broker_pid" 2>/dev/null
        wait "$broker_pid" 2>/dev/null
    fi
    rm -f "$ZDIST_SCHEDULER_FILE"
    rmdir "$state_dir" 2>/dev/null
    exit "$user_status"
}
trap cleanup EXIT
trap 'user_status=143; cleanup' INT TERM

broker_args=(--scheduler-file "$ZDIST_SCHEDULER_FILE" --port 0 --log-level warning)
if [ -n "$interface" ]; then
    broker_args+=(--interface "$interface")
else
    broker_args+=(--host 0.0.0.0) # workers on other nodes reach it by hostname
fi
"$python" -m zdist.broker "${broker_args[@]}" >/dev/null &
broker_pid=$!
for _ in $(seq 600); do
    [ -s "$ZDIST_SCHEDULER_FILE" ] && break
    kill -0 "$broker_pid" 2>/dev/null || { say "zbroker failed to start"; broker_pid=; exit 1; }
    sleep 0.1
done
[ -s "$ZDIST_SCHEDULER_FILE" ] || { say "zbroker wrote no scheduler file"; exit 1; }

# One task per node holding the node's CPUs of this job; each names its worker after
# its node (srun sets SLURMD_NODENAME in the step).
# $ZDIST_WORKER_ARGS is split into words on purpose.
# shellcheck disable=SC2086,SC2016
srun --overlap --nodes="$n_nodes" --ntasks="$n_nodes" --ntasks-per-node=1 \
    --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=0 \
    /bin/bash -c 'exec "$0" -m zdist.worker --name "zworker-$SLURMD_NODENAME" "$@"' \
    "$python" --scheduler-file "$ZDIST_SCHEDULER_FILE" --death-timeout "$death_timeout" \
    ${interface:+--interface "$interface"} ${ZDIST_WORKER_ARGS:-} &
srun_pid=$!
say "broker and $n_nodes node(s) started; scheduler file $ZDIST_SCHEDULER_FILE"

wait_workers=${ZDIST_WAIT_WORKERS:-$n_nodes}
if [ "$wait_workers" -gt 0 ]; then
    "$python" - "$ZDIST_SCHEDULER_FILE" "$wait_workers" "${ZDIST_WAIT_TIMEOUT:-300}" <<'EOF' || exit 1
import sys
from zdist import Client
path, n, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with Client(scheduler_file=path) as client:
    try:
        client.wait_for_workers(n, timeout=timeout)
    except TimeoutError:
        sys.exit(f"slurm-job: fewer than {n} workers registered within {timeout:.0f} s")
EOF
fi

set +e
"$python" "$user_script" "$@"
user_status=$?
set -e
