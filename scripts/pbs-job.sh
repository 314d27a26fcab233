#!/usr/bin/env bash
# One PBS job that runs a whole zdist computation: a broker, a worker on every node of
# the job, and your Python script; then it stops everything it started.
#
# Gadi (NCI, PBS Pro): remove ONE '#' from the '##PBS' lines you need and edit them.
# PBS reads only lines that start with exactly '#PBS', before the first command.
#PBS -N zdist-job
#PBS -l walltime=00:10:00
##PBS -q normal
##PBS -P vp91
##PBS -l ncpus=96
##PBS -l mem=380GB
##PBS -l jobfs=100GB
##PBS -l storage=scratch/vp91+gdata/vp91
##PBS -l wd
#
# Submit (your script is the argument, or ZDIST_SCRIPT):
#   Gadi / PBS Pro:  qsub -v ZDIST_SCRIPT=$PWD/analysis.py scripts/pbs-job.sh
#   Torque:          qsub -F "analysis.py" scripts/pbs-job.sh
#   Slurm's Torque wrappers (slurm-wlm-torque): qsub scripts/pbs-job.sh analysis.py
#   no batch system: bash scripts/pbs-job.sh analysis.py     (one local worker)
#
# Your script connects with the scheduler file that this job exports:
#   import os
#   from zdist import Client
#   client = Client(scheduler_file=os.environ["ZDIST_SCHEDULER_FILE"])
# The workers have registered before your script starts (see ZDIST_WAIT_WORKERS).
#
# Settings (environment; with PBS Pro pass them with qsub -v NAME=value,...):
#   ZDIST_SCRIPT          the Python script to run, when not given as the argument
#   ZDIST_PYTHON          the Python with zdist installed [default: python3 on PATH,
#                         e.g. after the 'source .../bin/activate' line below]
#   ZDIST_INTERFACE       network interface for broker and workers, e.g. ib0 on Gadi
#   ZDIST_WORKER_ARGS     extra zworker options per node, e.g. "--nworkers 8 --nthreads 6"
#                         [default: one worker process using every core of the node;
#                         it spills to $PBS_JOBFS, Gadi's node-local disk, when set]
#   ZDIST_WAIT_WORKERS    worker processes to wait for before the script starts
#                         [default: one per node; 0: do not wait]
#   ZDIST_WAIT_TIMEOUT    seconds to wait for them [default: 300]
#   ZDIST_LAUNCHER        how to start workers on other nodes: pbsdsh, ssh or mpirun
#                         [default: pbsdsh where it exists, else ssh]
#   ZDIST_SCHEDULER_FILE  where the broker writes its address and keys (mode 0600, in
#                         a 0700 directory); it must be on a filesystem every node
#                         shares [default: $PBS_O_WORKDIR/.zdist-job-$PBS_JOBID/]
#
# Launchers: pbsdsh (PBS Pro and Torque) starts the worker through the node's PBS MoM,
# inside the job, so PBS accounts for it and kills it with the job: use it on Gadi.
# ssh works where the site lets you ssh to the nodes of your own job (Gadi does); such
# workers are stopped through the broker at the end and, failing that, exit by
# themselves --death-timeout seconds after the broker stops. mpirun (Open MPI) uses
# PBS's TM interface like pbsdsh; Intel MPI's flags differ. The node this script runs
# on gets a local background worker. Slurm's Torque wrappers set no PBS_NODEFILE, so
# there (and outside any batch system) one local worker runs.

# Gadi: load your modules and environment here, e.g.
#   module load python3/3.11.0
#   source /scratch/vp91/Training-Venv/parallel_python/bin/activate

set -euo pipefail

say() { printf 'pbs-job: %s\n' "$*" >&2; }

user_script=${1:-${ZDIST_SCRIPT:-}}
if [ -z "$user_script" ]; then
    say "usage: pbs-job.sh SCRIPT.py [ARGS...] (or set ZDIST_SCRIPT)"
    exit 2
fi
[ $# -gt 0 ] && shift
python=$(command -v "${ZDIST_PYTHON:-python3}") || {
    say "no Python at '${ZDIST_PYTHON:-python3}': set ZDIST_PYTHON or activate the environment"
    exit 2
}
workdir=${PBS_O_WORKDIR:-$PWD}
cd "$workdir"
job_id=${PBS_JOBID:-${SLURM_JOB_ID:-$$}}
interface=${ZDIST_INTERFACE:-}
death_timeout=${ZDIST_DEATH_TIMEOUT:-60}
umask 077
if [ -z "${ZDIST_SCHEDULER_FILE:-}" ]; then
    ZDIST_SCHEDULER_FILE=$workdir/.zdist-job-$job_id/scheduler.json
fi
export ZDIST_SCHEDULER_FILE
state_dir=$(dirname "$ZDIST_SCHEDULER_FILE")
mkdir -p "$state_dir"
rm -f "$ZDIST_SCHEDULER_FILE" # a stale file would point the workers elsewhere

# The nodes: PBS_NODEFILE lists each node once per core; one worker per node.
nodes=()
if [ -n "${PBS_NODEFILE:-}" ] && [ -s "$PBS_NODEFILE" ]; then
    mapfile -t nodes < <(awk 'NF && !seen[$1]++ { print $1 }' "$PBS_NODEFILE")
fi
[ ${#nodes[@]} -gt 0 ] || nodes=("$(hostname)")
export ZDIST_N_NODES=${#nodes[@]}

pids=()
broker_pid=
user_status=1

cleanup() {
    trap - EXIT INT TERM
    set +e
    if [ -n "$broker_pid" ] && [ -s "$ZDIST_SCHEDULER_FILE" ]; then
        # Ask every worker, wherever it runs, to hand back its work and exit.
        "$python" - "$ZDIST_SCHEDULER_FILE" <<'EOF' >/dev/null 2>&1
import sys
from zdist import Client, get_worker
with Client(scheduler_file=sys.argv[1], timeout=10) as client:
    client.run(lambda: get_worker().close_gracefully("the job script is done"))
EOF
    fi
    local deadline=$((SECONDS + 30)) pid
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
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

is_this_host() {
    local h=${1%%.*}
    [ "$h" = "$(hostname -s)" ] || [ "$1" = "$(hostname)" ] || [ "$h" = localhost ]
}

launcher=${ZDIST_LAUNCHER:-}
if [ -z "$launcher" ]; then
    if command -v pbsdsh >/dev/null; then launcher=pbsdsh; else launcher=ssh; fi
fi

for node in "${nodes[@]}"; do
    # $ZDIST_WORKER_ARGS is split into words on purpose.
    # shellcheck disable=SC2206
    worker=("$python" -m zdist.worker --scheduler-file "$ZDIST_SCHEDULER_FILE"
        --name "zworker-${node%%.*}" --death-timeout "$death_timeout"
        ${interface:+--interface "$interface"} ${ZDIST_WORKER_ARGS:-})
    if [ -n "${PBS_JOBFS:-}" ] && [[ " ${ZDIST_WORKER_ARGS:-} " != *" --local-directory"* ]]; then
        worker+=(--local-directory "$PBS_JOBFS") # the same path on every node of the job
    fi
    if is_this_host "$node"; then
        "${worker[@]}" &
    else
        # Remote launchers pass no environment: carry what Python needs.
        remote="cd $(printf '%q' "$workdir") && exec env"
        for var in PATH PYTHONPATH VIRTUAL_ENV LD_LIBRARY_PATH; do
            [ -n "${!var:-}" ] && remote+=" $var=$(printf '%q' "${!var}")"
        done
        remote+=" $(printf '%q ' "${worker[@]}")"
        case $launcher in
        pbsdsh)
            # pbsdsh -n takes the index of a line of PBS_NODEFILE.
            index=$(awk -v n="$node" '$1 == n { print NR - 1; exit }' "$PBS_NODEFILE")
            pbsdsh -n "$index" -- /bin/bash -c "$remote" &
            ;;
        ssh) ssh -o BatchMode=yes "$node" "$remote" </dev/null & ;;
        mpirun) mpirun --host "$node" -np 1 /bin/bash -c "$remote" </dev/null & ;;
        *) say "unknown ZDIST_LAUNCHER '$launcher' (pbsdsh, ssh or mpirun)"; exit 2 ;;
        esac
    fi
    pids+=($!)
done
say "broker and ${#nodes[@]} node(s) started; scheduler file $ZDIST_SCHEDULER_FILE"

wait_workers=${ZDIST_WAIT_WORKERS:-${#nodes[@]}}
if [ "$wait_workers" -gt 0 ]; then
    "$python" - "$ZDIST_SCHEDULER_FILE" "$wait_workers" "${ZDIST_WAIT_TIMEOUT:-300}" <<'EOF' || exit 1
import sys
from zdist import Client
path, n, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with Client(scheduler_file=path) as client:
    try:
        client.wait_for_workers(n, timeout=timeout)
    except TimeoutError:
        sys.exit(f"pbs-job: fewer than {n} workers registered within {timeout:.0f} s")
EOF
fi

set +e
"$python" "$user_script" "$@"
user_status=$?
set -e
