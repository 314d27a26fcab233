"""`zdist status` against a real zbroker and zworkers, during and after a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cli import start_broker, stop
from utils import wait_for, zproc

from zdist import Client

pytestmark = pytest.mark.timeout(120)

PY = sys.executable
#: The console script setup.cfg installs next to this interpreter.
ZDIST = str(Path(PY).with_name("zdist"))
ACTIVE = ("waiting", "ready", "processing")


def gated(gate: str) -> Callable[[int], int]:
    """A task that runs until ``gate`` exists (a closure, so workers get it by value).
    Bounded, so a failing test cannot leave workers busy for long."""

    def wait_gate(i: int) -> int:
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        return i

    return wait_gate


@pytest.fixture
def cluster_files(tmp_path: Path) -> Iterator[str]:
    sf = str(tmp_path / "scheduler.json")
    broker, _ = start_broker(
        "--scheduler-file",
        sf,
        "--heartbeat-interval",
        "0.2",
        "--dashboard-address",
        "none",
    )
    # zproc: stdin is a lifeline, so the workers go even if this test is killed.
    workers = zproc(
        [
            "zdist.worker",
            "--scheduler-file",
            sf,
            "--nworkers",
            "2",
            "--nthreads",
            "1",
            "--name",
            "st",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        yield sf
    finally:
        stop(workers)
        stop(broker)


def status_json(sf: str) -> dict[str, Any]:
    out = subprocess.run(
        [ZDIST, "status", "--scheduler-file", sf, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_status_during_and_after_a_run(cluster_files: str, tmp_path: Path) -> None:
    sf = cluster_files
    gate = tmp_path / "gate"
    with Client(scheduler_file=sf, set_as_default=False) as c:
        c.wait_for_workers(2, timeout=30)
        futures = c.map(gated(str(gate)), range(20))
        try:
            # Both workers busy (their heartbeats report one running task each) and
            # every task somewhere between submitted and done: the gate is shut.
            view = wait_for(
                lambda: (
                    (v := status_json(sf))
                    and [w["running"] for w in v["workers"]] == [1, 1]
                    and v
                ),
                timeout=60,
                what="both workers running a task",
            )
            assert [w["name"] for w in view["workers"]] == ["st-0", "st-1"]
            assert all(
                w["nthreads"] == 1 and w["status"] == "running" for w in view["workers"]
            )
            tasks = view["tasks"]
            assert sum(tasks[s] for s in ACTIVE) == 20, tasks
            assert tasks["processing"] >= 2 and tasks["memory"] == 0, tasks
            assert sum(w["processing"] for w in view["workers"]) == tasks["processing"]
            assert sum(w["running"] + w["queued"] for w in view["workers"]) <= 20
            [group] = view["groups"]
            assert group == {"name": "wait_gate", "total": 20, "done": 0, "erred": 0}
            assert all(w["heartbeat_age"] is not None for w in view["workers"])
        finally:
            gate.touch()
        assert c.gather(futures) == list(range(20))

        view = status_json(sf)
        assert len(view["workers"]) == 2
        assert view["tasks"]["memory"] == 20
        assert sum(view["tasks"][s] for s in ACTIVE) == 0
        assert view["groups"][0]["done"] == 20
        assert sum(w["in_memory"] for w in view["workers"]) == 20

        table = subprocess.run(
            [ZDIST, "status", "--scheduler-file", sf],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert table.returncode == 0, table.stderr
    text = table.stdout
    lines = text.splitlines()
    assert lines[0].startswith("broker tcp://") and "workers 2" in lines[0]
    for name in ("st-0", "st-1"):
        [row] = [ln for ln in lines if ln.startswith(name + " ")]
        assert " running " in row and "/" in row  # status, memory used / limit
    head = next(ln for ln in lines if ln.startswith("TASKS"))
    counts = lines[lines.index(head) + 1].split()
    assert dict(zip(head.split()[1:], counts[1:], strict=True))["memory"] == "20"
    assert any(ln.startswith("wait_gate") and "100%" in ln for ln in lines), text


def test_status_watch_refreshes_until_ctrl_c(cluster_files: str) -> None:
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "zdist",
            "status",
            "--scheduler-file",
            cluster_files,
            "--json",
            "--watch",
            "0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        views = [json.loads(proc.stdout.readline()) for _ in range(3)]  # type: ignore[union-attr]
        assert all("workers" in v and "tasks" in v for v in views)
        assert len({v["time"] for v in views}) == 3  # three snapshots, not one repeated
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert "Traceback" not in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        stop(proc, signal.SIGKILL)


def test_status_without_a_scheduler_file_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    for argv in ([ZDIST], [PY, "-m", "zdist"]):
        out = subprocess.run(
            [*argv, "status", "--scheduler-file", str(missing)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode != 0
        assert f"no scheduler file at {missing}" in out.stderr
        assert "Traceback" not in out.stderr and out.stdout == ""


def test_status_with_a_stale_scheduler_file_says_so(tmp_path: Path) -> None:
    sf = str(tmp_path / "stale.json")
    broker, _ = start_broker("--scheduler-file", sf, "--dashboard-address", "none")
    stop(broker)  # the file stays behind, naming a broker that is gone
    out = subprocess.run(
        [ZDIST, "status", "--scheduler-file", sf, "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "cannot reach the broker" in out.stderr and "Traceback" not in out.stderr
