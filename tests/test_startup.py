"""Cluster start-up: workers that start before their broker has an address (ADDRESS
``-``, the address comes later on stdin) and workers forked by their supervisor."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import tasks
from utils import descendants, parent_of, wait_for, zproc

from zdist import Client, LocalCluster, Security, ZdistError
from zdist.client.local import BrokerProcess

pytestmark = pytest.mark.timeout(90)

KEY_FIELDS = ("server_public", "server_secret", "member_public", "member_secret")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _cmdline(pid: int) -> bytes:
    return _read(f"/proc/{pid}/cmdline")


def _close(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()


def _early_worker(*args: str) -> subprocess.Popen:
    """A zworker told that its broker's address comes later, on stdin."""
    # --log-level warning: stderr is a pipe that nobody reads until the worker exits.
    argv = ["zdist.worker", "-", "--security-file", "-", "--log-level", "warning"]
    return zproc([*argv, "--nthreads", "1", *args], stderr=subprocess.PIPE)


def _send_line(proc: subprocess.Popen, text: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(text.encode() + b"\n")
    proc.stdin.flush()


@pytest.fixture
def keys() -> Security:
    return Security.temporary()


@pytest.mark.parametrize("nanny", ["--nanny", "--no-nanny"])
def test_worker_started_before_its_broker_registers(keys: Security, nanny: str) -> None:
    worker = _early_worker("--name", "early", nanny)
    broker = None
    try:
        _send_line(worker, json.dumps(keys.to_dict()))
        # The broker does not exist yet: it starts only now.
        broker = BrokerProcess(keys, log_level="warning")
        assert worker.poll() is None  # still waiting for the address, not failed
        _send_line(worker, broker.address)
        with Client(broker.address, security=keys, set_as_default=False) as c:
            c.wait_for_workers(1, timeout=60)
            [w] = c.scheduler_info()["workers"].values()
            assert w["name"] == "early"
            assert c.submit(tasks.inc, 41).result(timeout=60) == 42
    finally:
        _close(worker)
        if broker is not None:
            broker.close()


@pytest.mark.parametrize("nanny", ["--nanny", "--no-nanny"])
def test_worker_whose_broker_never_reports_exits_when_lifeline_closes(
    keys: Security, nanny: str
) -> None:
    worker = _early_worker(nanny)
    try:
        _send_line(worker, json.dumps(keys.to_dict()))
        assert worker.stdin is not None
        worker.stdin.close()  # the parent died before its broker reported
        assert worker.wait(60) == 0
        assert worker.stderr is not None
        err = worker.stderr.read().decode()
        assert "Traceback" not in err, err
    finally:
        _close(worker)


def test_early_worker_without_lifeline_says_what_it_missed(keys: Security) -> None:
    worker = subprocess.Popen(
        [sys.executable, "-m", "zdist.worker", "-", "--security-file", "-"],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out = worker.communicate(json.dumps(keys.to_dict()).encode() + b"\n", 60)[1]
        assert worker.returncode != 0
        assert b"address" in out and b"Traceback" not in out, out
    finally:
        _close(worker)


def test_local_cluster_children_carry_no_key_material() -> None:
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as lc:
        assert lc.security is not None
        secrets = [getattr(lc.security, f).encode() for f in KEY_FIELDS]
        with Client(lc, set_as_default=False) as c:
            worker_pids = {w["pid"] for w in c.scheduler_info()["workers"].values()}
        children = descendants(os.getpid())
        # broker + per worker its supervisor and the worker (forked or spawned)
        assert lc.broker_pid in children and worker_pids <= set(children)
        assert len(children) >= 5, children
        ps = subprocess.run(
            ["ps", "-eo", "args"], capture_output=True, check=True, timeout=30
        ).stdout
        for pid in children:
            cmdline = _cmdline(pid)
            environ = _read(f"/proc/{pid}/environ")
            for secret in secrets:
                assert secret not in cmdline and secret not in environ, pid
        for secret in secrets:
            assert secret not in ps


def test_local_cluster_restarts_a_killed_worker() -> None:
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as lc,
        Client(lc, set_as_default=False) as c,
    ):
        before = {w["name"]: w["pid"] for w in c.scheduler_info()["workers"].values()}
        os.kill(before["0"], signal.SIGKILL)

        def restarted() -> tuple[str, int] | None:
            for address, w in c.scheduler_info()["workers"].items():
                if w["name"] == "0" and w["pid"] != before["0"]:
                    return address, w["pid"]
            return None

        address, pid = wait_for(restarted, timeout=60, what="worker 0 to come back")
        assert pid in descendants(lc.workers["0"].proc.pid)
        # Straight to the new worker: the broker may not yet have noticed the old
        # one (also named "0") is dead.
        assert c.run(tasks.pid, workers=[address]) == {address: pid}


def test_forked_workers_exit_with_their_supervisor(keys: Security) -> None:
    broker = BrokerProcess(keys, log_level="warning")
    nanny = zproc(
        [
            "zdist.worker",
            broker.address,
            "--security-file",
            "-",
            "--nworkers",
            "2",
            "--nthreads",
            "1",
            "--name",
            "pair",
        ]
    )
    try:
        _send_line(nanny, json.dumps(keys.to_dict()))
        with Client(broker.address, security=keys, set_as_default=False) as c:
            c.wait_for_workers(2, timeout=60)
            pids = [w["pid"] for w in c.scheduler_info()["workers"].values()]
        assert all(parent_of(p) == nanny.pid for p in pids)  # forked by it
        # Each worker's stdin is its own pipe from the supervisor, and no other worker
        # holds that pipe (or it would keep the lifeline open).
        stdins = {p: os.readlink(f"/proc/{p}/fd/0") for p in pids}
        assert len(set(stdins.values())) == 2 and all(
            v.startswith("pipe:") for v in stdins.values()
        )
        for p in pids:
            held = {
                os.readlink(f"/proc/{p}/fd/{fd}") for fd in os.listdir(f"/proc/{p}/fd")
            }
            assert not held & {v for q, v in stdins.items() if q != p}, p
        nanny.kill()  # no cleanup: only the pipes' end of file tells the workers
        nanny.wait(30)
        wait_for(
            lambda: not any(_alive(p) for p in pids),
            timeout=30,
            what="both workers to follow their supervisor",
        )
    finally:
        _close(nanny)
        broker.close()


def test_local_cluster_whose_broker_fails_raises_and_leaves_no_process() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ZdistError, match="zbroker did not start"):
            LocalCluster(n_workers=2, scheduler_port=port, dashboard_address=None)
    # The workers started before the broker failed; they exit with it.
    wait_for(
        lambda: not [p for p in descendants(os.getpid()) if b"zdist" in _cmdline(p)],
        timeout=30,
        what="the early-started workers to exit",
    )
