"""zbroker and zworker as real subprocesses, connected through a scheduler file."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator

import pytest
import tasks
from utils import descendants, wait_for, zproc

from zdist import Client

pytestmark = pytest.mark.timeout(60)

PY = sys.executable


def start_broker(*args: str) -> tuple[subprocess.Popen, str]:
    proc = zproc(
        ["zdist.broker", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # type: ignore[union-attr]
    assert "listening at tcp://" in line, proc.stderr.read()  # type: ignore[union-attr]
    return proc, line.split("listening at ", 1)[1].strip()


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    code = proc.wait(15)
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()
    return code


@pytest.fixture
def broker(tmp_path) -> Iterator[tuple[subprocess.Popen, str, str]]:
    sf = str(tmp_path / "scheduler.json")
    proc, address = start_broker("--scheduler-file", sf, "--heartbeat-interval", "0.1")
    yield proc, address, sf
    stop(proc)


def test_broker_writes_private_scheduler_file(broker) -> None:
    _, address, sf = broker
    assert stat.S_IMODE(os.stat(sf).st_mode) == 0o600
    info = json.load(open(sf))
    assert info["address"] == address
    assert set(info["security"]) == {
        "server_public",
        "server_secret",
        "member_public",
        "member_secret",
    }


def test_workers_and_client_through_scheduler_file(broker) -> None:
    proc, _address, sf = broker
    worker = zproc(
        [
            "zdist.worker",
            "--scheduler-file",
            sf,
            "--nworkers",
            "2",
            "--nthreads",
            "1",
            "--name",
            "cli",
        ]
    )
    try:
        with Client(scheduler_file=sf) as c:
            c.wait_for_workers(2, timeout=30)
            names = sorted(w["name"] for w in c.scheduler_info()["workers"].values())
            assert names == ["cli-0", "cli-1"]
            assert sum(c.gather(c.map(tasks.inc, range(100)))) == sum(range(1, 101))
        assert stop(worker) == 0  # SIGTERM: hand back, exit cleanly
    finally:
        if worker.poll() is None:
            worker.kill()
    assert stop(proc) == 0


def test_worker_waits_for_scheduler_file_to_appear(tmp_path) -> None:
    sf = str(tmp_path / "later.json")
    worker = zproc(["zdist.worker", "--scheduler-file", sf, "--nthreads", "1"])
    try:
        proc, _ = start_broker("--scheduler-file", sf)
        try:
            with Client(scheduler_file=sf) as c:
                c.wait_for_workers(1, timeout=30)
                assert c.submit(tasks.inc, 1).result() == 2
        finally:
            stop(proc)
    finally:
        stop(worker)


def test_worker_death_timeout_exits(tmp_path) -> None:
    sf = tmp_path / "gone.json"
    proc, _address = start_broker("--scheduler-file", str(sf))
    stop(proc)
    worker = subprocess.run(
        [
            PY,
            "-m",
            "zdist.worker",
            "--scheduler-file",
            str(sf),
            "--death-timeout",
            "1",
            "--no-nanny",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert worker.returncode == 0
    assert "no broker" in worker.stderr


def test_broker_without_a_way_to_share_keys_is_refused() -> None:
    out = subprocess.run(
        [PY, "-m", "zdist.broker", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "--scheduler-file" in out.stderr and "Traceback" not in out.stderr


def test_help_texts() -> None:
    for mod, words in (
        ("zdist.broker", ["--scheduler-file", "--interface", "--port"]),
        (
            "zdist.worker",
            [
                "--nworkers",
                "--resources",
                "--death-timeout",
                "--memory-limit",
                "--local-directory",
            ],
        ),
    ):
        out = subprocess.run(
            [PY, "-m", mod, "--help"], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0
        for w in words:
            assert w in out.stdout


def test_missing_scheduler_file_is_a_clear_error(tmp_path) -> None:
    out = subprocess.run(
        [
            PY,
            "-m",
            "zdist.worker",
            "--scheduler-file",
            str(tmp_path / "none.json"),
            "--death-timeout",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "did not appear" in out.stderr and "Traceback" not in out.stderr


def test_wrong_address_is_a_clear_error() -> None:
    out = subprocess.run(
        [PY, "-m", "zdist.worker", "localhost:1234", "--no-security"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "tcp://host:port" in out.stderr and "Traceback" not in out.stderr


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run(
            [PY, "-m", "zdist.broker", "--port", str(port), "--no-security"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert out.returncode != 0
    assert "already in use" in out.stderr and "Traceback" not in out.stderr


def test_interface_option_binds_that_address(tmp_path) -> None:
    out = subprocess.run(
        [PY, "-m", "zdist.broker", "--interface", "nosuch0", "--no-security"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0 and "nosuch0" in out.stderr
    proc, address = start_broker("--interface", "lo", "--no-security")
    try:
        assert address.startswith("tcp://127.0.0.1:")
    finally:
        stop(proc)


def test_resources_option(broker) -> None:
    _, _, sf = broker
    worker = zproc(
        [
            "zdist.worker",
            "--scheduler-file",
            sf,
            "--resources",
            "GPU=2 MEM=10e9",
            "--nthreads",
            "2",
        ]
    )
    try:
        with Client(scheduler_file=sf) as c:
            c.wait_for_workers(1, timeout=30)
            [w] = c.scheduler_info()["workers"].values()
            assert w["resources"] == {"GPU": 2.0, "MEM": 1e10}
            assert c.submit(tasks.inc, 1, resources={"GPU": 1}).result() == 2
    finally:
        stop(worker)


def test_worker_sets_single_threaded_blas(broker) -> None:
    _, _, sf = broker
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    worker = zproc(["zdist.worker", "--scheduler-file", sf], env=env)
    try:
        with Client(scheduler_file=sf) as c:
            c.wait_for_workers(1, timeout=30)
            got = c.submit(tasks.getenv, "OMP_NUM_THREADS", pure=False).result()
            assert got == "1"
    finally:
        stop(worker)


def test_nanny_restarts_a_crashed_worker(broker) -> None:
    _, _, sf = broker
    worker = zproc(["zdist.worker", "--scheduler-file", sf])
    try:
        with Client(scheduler_file=sf) as c:
            c.wait_for_workers(1, timeout=30)
            first = c.submit(tasks.pid, pure=False).result()
            os.kill(first, signal.SIGKILL)

            def new_pid() -> int | None:
                workers = c.scheduler_info()["workers"].values()
                pids = [w["pid"] for w in workers if w["pid"] != first]
                return pids[0] if pids else None

            second = wait_for(new_pid, timeout=30, what="a restarted worker")
            assert second != first
            assert c.submit(tasks.inc, 5).result() == 6
    finally:
        stop(worker)


def test_broker_killed_worker_processes_follow_lifeline(tmp_path) -> None:
    # A LocalCluster's children exit when their parent dies, even by SIGKILL.
    script = (
        "import sys, time\n"
        "from zdist import LocalCluster\n"
        "c = LocalCluster(n_workers=2, threads_per_worker=1)\n"
        "print(c.broker_pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([PY, "-c", script], stdout=subprocess.PIPE, text=True)
    broker_pid = int(parent.stdout.readline())  # type: ignore[union-attr]
    children = descendants(parent.pid)
    assert (
        broker_pid in children and len(children) >= 5
    )  # broker + 2 x (nanny + worker)
    parent.kill()
    parent.wait()
    parent.stdout.close()  # type: ignore[union-attr]
    wait_for(
        lambda: not any(_alive(p) for p in children),
        timeout=20,
        what="every child process to exit",
    )


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sigterm_hands_off_needed_results_instead_of_recomputing(
    broker, tmp_path
) -> None:
    _, _, sf = broker
    runs = tmp_path / "runs.txt"
    leaving = zproc(
        ["zdist.worker", "--scheduler-file", sf, "--name", "leaving", "--nthreads", "1"]
    )
    staying = None
    try:
        with Client(scheduler_file=sf) as c:
            c.wait_for_workers(1, timeout=30)
            x = c.submit(tasks.counted_bytes, str(runs), 2_000_000, pure=False)
            x.result()
            staying = zproc(
                [
                    "zdist.worker",
                    "--scheduler-file",
                    sf,
                    "--name",
                    "staying",
                    "--nthreads",
                    "1",
                ]
            )
            c.wait_for_workers(2, timeout=30)
            assert stop(leaving) == 0
            names = [w["name"] for w in c.scheduler_info()["workers"].values()]
            assert names == ["staying"]
            assert c.submit(len, x).result() == 2_000_000
            assert runs.read_text().count("ran") == 1  # moved, not recomputed
    finally:
        for p in (leaving, staying):
            if p is not None and p.poll() is None:
                stop(p)


def test_gpu_auto_starts_one_pinned_worker_per_gpu(broker, tmp_path) -> None:
    # A stand-in nvidia-smi listing two GPUs (this machine has none; the lent GPU
    # machine is where the real command is checked).
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\necho 'GPU 0: Fake A (UUID: GPU-a)'\n"
        "echo 'GPU 1: Fake B (UUID: GPU-b)'\n"
    )
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    _, _, sf = broker
    worker = zproc(
        [
            "zdist.worker",
            "--scheduler-file",
            sf,
            "--resources",
            "GPU=auto",
            "--name",
            "gpu",
        ],
        env=env,
    )
    try:
        with Client(scheduler_file=sf) as c:
            c.wait_for_workers(2, timeout=30)
            workers = c.scheduler_info()["workers"].values()
            assert sorted(w["name"] for w in workers) == ["gpu-0", "gpu-1"]
            assert all(w["resources"] == {"GPU": 1.0} for w in workers)
            seen = c.run(tasks.getenv, "CUDA_VISIBLE_DEVICES")
            assert sorted(seen.values()) == ["0", "1"]
            f = c.submit(
                tasks.getenv, "CUDA_VISIBLE_DEVICES", resources={"GPU": 1}, pure=False
            )
            assert f.result() in ("0", "1")
    finally:
        stop(worker)
    no_gpu = subprocess.run(
        [PY, "-m", "zdist.worker", "--scheduler-file", sf, "--resources", "GPU=auto"],
        env={**env, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert no_gpu.returncode != 0 and "found no GPU" in no_gpu.stderr
