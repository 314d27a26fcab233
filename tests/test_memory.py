"""Worker memory management: spilling, pausing, restarting (dask's thresholds)."""

from __future__ import annotations

import os
import subprocess

import pytest
import tasks
from utils import wait_for, zproc

from zdist import Client, wait
from zdist.worker.memory import SpillBuffer

pytestmark = pytest.mark.timeout(90)

MB = 1_000_000


def test_spill_buffer_moves_least_recently_used_to_disk(tmp_path) -> None:
    buf = SpillBuffer(str(tmp_path), target=3 * MB)
    for i in range(5):
        buf.put(f"k{i}", bytes([i]) * MB, MB)
    assert set(buf.slow) == {"k0", "k1"}
    assert buf.fast_bytes <= 3 * MB
    assert len(os.listdir(tmp_path / "spill")) == 2
    assert buf["k0"] == b"\x00" * MB  # comes back when needed
    assert "k0" in buf.fast and "k0" not in buf.slow
    buf.discard("k1")
    assert "k1" not in buf and len(buf) == 4
    buf.close()
    assert not (tmp_path / "spill").exists()


def _start_broker(sf: str) -> subprocess.Popen:
    proc = zproc(
        ["zdist.broker", "--port", "0", "--scheduler-file", sf],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert "listening" in proc.stdout.readline()  # type: ignore[union-attr]
    return proc


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
        p.wait(20)
        for f in (p.stdin, p.stdout):
            if f:
                f.close()


def test_worker_spills_results_beyond_target_and_reads_them_back(tmp_path) -> None:
    sf = str(tmp_path / "s.json")
    broker = _start_broker(sf)
    # 100 MB limit: results beyond 60 MB go to disk.
    worker = zproc(
        [
            "zdist.worker",
            "--scheduler-file",
            sf,
            "--memory-limit",
            "100MB",
            "--memory-pause-fraction",
            "false",
            "--memory-spill-fraction",
            "false",
            "--memory-terminate-fraction",
            "false",
            "--local-directory",
            str(tmp_path / "w"),
        ]
    )
    try:
        with Client(scheduler_file=sf) as c:
            c.wait_for_workers(1, timeout=30)
            chunks = [
                c.submit(tasks.make_bytes, 10 * MB, i, pure=False) for i in range(10)
            ]
            wait(chunks)  # 100 MB of results on a worker with a 60 MB target
            spilled = c.run(_spilled)
            assert next(iter(spilled.values())) >= 4
            assert c.submit(tasks.length, *chunks).result() == 100 * MB
    finally:
        _stop(worker, broker)


def _spilled() -> int:
    from zdist import get_worker

    return len(get_worker().data.slow)


def test_supervisor_restarts_worker_above_terminate_fraction(tmp_path) -> None:
    sf = str(tmp_path / "s.json")
    broker = _start_broker(sf)
    worker = zproc(
        [
            "zdist.worker",
            "--scheduler-file",
            sf,
            "--memory-limit",
            "300MB",
            "--memory-target-fraction",
            "false",
            "--memory-spill-fraction",
            "false",
            "--memory-pause-fraction",
            "false",
        ]
    )
    try:
        with Client(scheduler_file=sf) as c:
            c.wait_for_workers(1, timeout=30)
            first = c.submit(tasks.pid, pure=False).result()
            hog = c.submit(_hold_memory, 400 * MB, pure=False)

            def restarted() -> bool:
                pids = [w["pid"] for w in c.scheduler_info()["workers"].values()]
                return bool(pids) and first not in pids

            wait_for(restarted, timeout=60, what="the supervisor to restart the worker")
            assert c.submit(tasks.inc, 1).result() == 2
            del hog
    finally:
        _stop(worker, broker)


def _hold_memory(n: int) -> int:
    import time

    block = bytearray(n)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    time.sleep(60)
    return len(block)


def test_worker_pauses_above_pause_fraction(tmp_path) -> None:
    sf = str(tmp_path / "s.json")
    broker = _start_broker(sf)
    worker = zproc(
        [
            "zdist.worker",
            "--scheduler-file",
            sf,
            "--memory-limit",
            "200MB",
            "--memory-target-fraction",
            "false",
            "--memory-spill-fraction",
            "false",
            "--memory-terminate-fraction",
            "false",
        ]
    )
    try:
        with Client(scheduler_file=sf) as c:
            c.wait_for_workers(1, timeout=30)
            big = c.submit(tasks.make_bytes, 200 * MB, pure=False)
            big.result()

            def status() -> str:
                [w] = c.scheduler_info()["workers"].values()
                return w["status"]

            wait_for(lambda: status() == "paused", timeout=30, what="worker to pause")
            queued = c.submit(tasks.inc, 41)
            with pytest.raises(TimeoutError):
                queued.result(timeout=1)  # a paused worker takes no new task
            del big  # frees the 200 MB: the worker resumes and runs it
            assert queued.result(timeout=30) == 42
            assert status() == "running"
    finally:
        _stop(worker, broker)
