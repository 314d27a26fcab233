#!/usr/bin/env bash
# A batch run on one machine, the way a job script does it: start zbroker with a
# scheduler file, two zworker processes, run a Python script that submits work and
# checks the answer, then stop everything (no process left behind).
#
#   bash scripts/local-batch.sh            # uses the python on PATH (activate the venv)
#   PYTHON=.venv/bin/python bash scripts/local-batch.sh
set -euo pipefail

PYTHON=${PYTHON:-python3}
workdir=$(mktemp -d "${TMPDIR:-/tmp}/zdist-batch.XXXXXX")
chmod 700 "$workdir"
sf="$workdir/scheduler.json"
pids=()

cleanup() {
    # SIGTERM: workers hand back their work and exit; the broker stops cleanly.
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$workdir"
}
trap cleanup EXIT

"$PYTHON" -m zdist.broker --port 0 --scheduler-file "$sf" --log-level warning >"$workdir/broker.out" &
pids+=($!)
for i in 1 2; do
    "$PYTHON" -m zdist.worker --scheduler-file "$sf" --nthreads 1 --name "batch-$i" \
        --death-timeout 60 --log-level warning &
    pids+=($!)
done

"$PYTHON" - "$sf" <<'PY'
import sys

from zdist import Client

with Client(scheduler_file=sys.argv[1]) as client:
    client.wait_for_workers(2, timeout=60)
    squares = client.map(lambda x: x * x, range(1000))
    total = client.submit(sum, squares)
    expected = sum(x * x for x in range(1000))
    got = total.result(timeout=60)
    workers = sorted(w["name"] for w in client.scheduler_info()["workers"].values())
    print(f"local-batch: sum of squares = {got} on workers {workers}")
    if got != expected or workers != ["batch-1", "batch-2"]:
        sys.exit(f"local-batch: FAILED (expected {expected})")
PY

cleanup
trap - EXIT
# Nothing of ours may survive: check the pids we started.
for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
        echo "local-batch: process $pid is still running" >&2
        exit 1
    fi
done
echo "local-batch: OK"
