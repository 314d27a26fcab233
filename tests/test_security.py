"""Secure by default (issue 3): only holders of the cluster's keys can make it run code.

Every attack here is a real pyzmq socket against a real broker or worker: a peer with no
keys (plaintext), with the broker's public key but a key pair of its own, and with the
member public key (say, read from a log) but a secret of its own. Each sends well-formed
protocol messages whose task would create a file. Positive controls send the very same
messages with the member keys and see them served, so the attack harness is known to
work; the refusals are then meaningful.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tasks
import zmq
from utils import descendants, wait_for

from zdist import Client, LocalCluster, serialize
from zdist import protocol as P
from zdist._version import versions
from zdist.errors import SecurityError
from zdist.security import Security, read_json_file, write_private_json
from zdist.worker.worker import WorkerConfig

pytestmark = pytest.mark.timeout(120)

PY = sys.executable
KEY_FIELDS = ("server_public", "server_secret", "member_public", "member_secret")
ATTACKERS = ["plaintext", "unlisted-keypair", "member-public-wrong-secret"]
#: How long an attacker's socket is watched for a reply, after a legitimate round trip
#: through the same broker has completed. The positive controls get their first reply
#: within milliseconds, so a breach would show up well inside this window.
WATCH = 2.0


# ======================================================================================
# processes


def _read_address(proc: subprocess.Popen[bytes], timeout: float = 60) -> str:
    assert proc.stdout is not None
    lines: list[bytes] = []
    reader = threading.Thread(
        target=lambda: lines.append(proc.stdout.readline()),  # type: ignore[union-attr]
        daemon=True,
    )
    reader.start()
    reader.join(timeout)
    line = lines[0].decode() if lines else ""
    assert "zbroker listening at " in line, f"zbroker did not start: {line!r}"
    return line.split("listening at ", 1)[1].strip()


def _start_zbroker(
    scheduler_file: Path, *args: str, log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [
                PY,
                "-m",
                "zdist.broker",
                "--scheduler-file",
                str(scheduler_file),
                "--lifeline",
                *args,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        return proc, _read_address(proc)
    except BaseException:
        _stop(proc)
        raise


def _start_zworker(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as err:
        return subprocess.Popen(
            [
                PY,
                "-m",
                "zdist.worker",
                "--nthreads",
                "1",
                "--memory-limit",
                "0",
                "--no-nanny",
                "--lifeline",
                *args,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            try:
                f.close()
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class ZbrokerCluster:
    scheduler_file: Path
    address: str
    security: Security
    broker: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes]
    broker_log: Path
    worker_log: Path


@pytest.fixture(scope="module")
def zbroker_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ZbrokerCluster]:
    """``zbroker --scheduler-file F --port 0`` and one ``zworker --scheduler-file F``,
    both logging at debug level to files (the log test reads them)."""
    d = tmp_path_factory.mktemp("zbroker")
    sched = d / "scheduler.json"
    broker_log, worker_log = d / "broker.log", d / "worker.log"
    broker, address = _start_zbroker(
        sched, "--port", "0", "--log-level", "debug", log=broker_log
    )
    worker = None
    try:
        worker = _start_zworker(
            "--scheduler-file",
            str(sched),
            "--name",
            "zbroker-worker",
            "--log-level",
            "debug",
            log=worker_log,
        )
        yield ZbrokerCluster(
            sched,
            address,
            Security.from_file(sched),
            broker,
            worker,
            broker_log,
            worker_log,
        )
    finally:
        if worker is not None:
            _stop(worker)
        _stop(broker)


@dataclass
class Target:
    """A live broker, its keys, an authorised client, and whether the broker lives."""

    address: str
    security: Security
    client: Client
    broker_alive: Callable[[], bool]


@pytest.fixture(params=["LocalCluster", "zbroker"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    if request.param == "LocalCluster":
        cluster = request.getfixturevalue("cluster")
        with Client(cluster, set_as_default=False) as c:
            yield Target(
                cluster.scheduler_address,
                cluster.security,
                c,
                lambda: _alive(cluster.broker_pid),
            )
    else:
        zb: ZbrokerCluster = request.getfixturevalue("zbroker_cluster")
        with Client(scheduler_file=str(zb.scheduler_file), set_as_default=False) as c:
            c.wait_for_workers(1, timeout=60)
            yield Target(zb.address, zb.security, c, lambda: zb.broker.poll() is None)


# ======================================================================================
# raw sockets and well-formed messages


def _credentials(kind: str, security: Security) -> dict[str, bytes] | None:
    """CURVE options for a raw socket: an attacker's, or the members' keys."""
    if kind == "plaintext":
        return None
    public, secret = zmq.curve_keypair()
    server = security.server_public.encode()
    if kind == "unlisted-keypair":
        return {"serverkey": server, "publickey": public, "secretkey": secret}
    if kind == "member-public-wrong-secret":
        return {
            "serverkey": server,
            "publickey": security.member_public.encode(),
            "secretkey": secret,
        }
    assert kind == "member-keys"
    return {
        "serverkey": server,
        "publickey": security.member_public.encode(),
        "secretkey": security.member_secret.encode(),
    }


def _send(sock: zmq.Socket[Any], frames: list[Any]) -> None:
    """Send without blocking: once a refused handshake has dropped the connection, a
    DEALER with no peer would block for ever (the message is then simply lost)."""
    try:
        sock.send_multipart(frames, zmq.NOBLOCK)
    except zmq.Again:
        pass


def _dealer(
    ctx: zmq.Context[Any], address: str, creds: dict[str, bytes] | None, role: str
) -> zmq.Socket[Any]:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.identity = f"{role}-{uuid.uuid4().hex}".encode()
    if creds is not None:
        sock.curve_serverkey = creds["serverkey"]
        sock.curve_publickey = creds["publickey"]
        sock.curve_secretkey = creds["secretkey"]
    sock.connect(address)
    return sock


def _submit_markers(markers: list[Path]) -> tuple[P.Submit, list[Any]]:
    """A Submit exactly as Client.submit builds it: tasks.touch(marker[0]) by
    reference and a lambda (cloudpickled by value) that creates marker[1]."""
    first, second = (str(m) for m in markers)
    fl = P.FrameList()
    entries = []
    for func, args in (
        (tasks.touch, (first,)),
        (lambda: open(second, "w").write("ran"), ()),
    ):
        frames, deps = serialize.dumps_args((args, {}))
        key = f"attack-{uuid.uuid4().hex}"
        fn = serialize.dumps_function(func)
        entries.append(
            [key, fl.add([fn]), fl.add(frames), deps, 0, 0, None, None, False]
        )
    return P.Submit(entries, [e[0] for e in entries]), fl.frames


def _register_worker(keys: list[str]) -> P.RegisterWorker:
    """A worker registration claiming to hold ``keys`` (so gathers would come to it)."""
    return P.RegisterWorker(
        "attacker-worker",
        4,
        0,
        {},
        "tcp://127.0.0.1:9",
        "attacker",
        os.getpid(),
        "/tmp",
        versions(),
        keys,
    )


def _replies(socks: list[zmq.Socket[Any]], timeout: float) -> list[Any]:
    """Every message any of ``socks`` receives within ``timeout`` seconds."""
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        for sock, _ in poller.poll(left * 1000):
            got.append(sock.recv_multipart())
    return got


def _recv_message(sock: zmq.Socket[Any], timeout: float = 30) -> tuple[Any, list[Any]]:
    assert sock.poll(timeout * 1000), f"no reply within {timeout} s"
    return P.decode(sock.recv_multipart())


# ======================================================================================
# 1. attackers against a live broker and a live worker's data port


@pytest.mark.parametrize("kind", ATTACKERS)
def test_broker_refuses_peers_without_the_member_keys(
    target: Target, kind: str, tmp_path: Path
) -> None:
    client = target.client
    held = client.submit(tasks.inc, 1, pure=False)
    assert held.result(timeout=60) == 2
    before = client.scheduler_info()
    markers = [tmp_path / "touched", tmp_path / "lambda-ran"]
    creds = _credentials(kind, target.security)
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        as_client = _dealer(ctx, target.address, creds, "c")
        submit, payload = _submit_markers(markers)
        _send(as_client, P.encode(P.RegisterClient("attacker", versions())))
        _send(as_client, P.encode(submit, payload))
        _send(as_client, P.encode(P.InfoRequest(1, "scheduler_info")))
        as_worker = _dealer(ctx, target.address, creds, "w")
        _send(as_worker, P.encode(_register_worker([held.key])))
        _send(as_worker, P.encode(P.Heartbeat({})))

        # Legitimate work through the same broker after the attack: tasks that the
        # attacker's worker would be offered if it had been admitted.
        futures = client.map(tasks.inc, range(20), pure=False)
        assert client.gather(futures) == list(range(1, 21))
        assert _replies([as_client, as_worker], WATCH) == []
        assert client.submit(tasks.inc, 41, pure=False).result(timeout=60) == 42
    finally:
        ctx.destroy(linger=0)
    assert not any(m.exists() for m in markers), "an attacker's task ran"
    after = client.scheduler_info()
    assert sorted(after["workers"]) == sorted(before["workers"])
    assert all(w["name"] != "attacker-worker" for w in after["workers"].values())
    assert after["n_clients"] <= before["n_clients"]
    assert target.broker_alive()
    assert held.result(timeout=60) == 2


def test_probe_with_member_keys_is_served(target: Target, tmp_path: Path) -> None:
    """Positive control: the attack's messages, sent with the member keys, are served
    (so the refusals above are the keys' doing, not malformed messages)."""
    markers = [tmp_path / "touched", tmp_path / "lambda-ran"]
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        sock = _dealer(
            ctx, target.address, _credentials("member-keys", target.security), "c"
        )
        _send(sock, P.encode(P.RegisterClient("probe", versions())))
        msg, _ = _recv_message(sock)
        assert isinstance(msg, P.Welcome)
        submit, payload = _submit_markers(markers)
        _send(sock, P.encode(submit, payload))
        wait_for(lambda: all(m.exists() for m in markers), 60, what="probe tasks")
        _send(sock, P.encode(P.ClientClose()))

        as_worker = _dealer(
            ctx, target.address, _credentials("member-keys", target.security), "w"
        )
        _send(as_worker, P.encode(_register_worker([])))
        msg, _ = _recv_message(as_worker)
        assert isinstance(msg, P.Welcome)
        _send(as_worker, P.encode(P.WorkerStatus("closed", [])))
        wait_for(
            lambda: all(
                w["name"] != "attacker-worker"
                for w in target.client.scheduler_info()["workers"].values()
            ),
            30,
            what="the probe worker to leave",
        )
    finally:
        ctx.destroy(linger=0)


def _get_data(sock: zmq.Socket[Any], keys: list[str]) -> None:
    _send(sock, P.encode(P.GetData(7, keys)))


@pytest.mark.parametrize("kind", ATTACKERS)
def test_worker_data_port_refuses_peers_without_the_member_keys(
    target: Target, kind: str
) -> None:
    client = target.client
    address = sorted(client.scheduler_info()["workers"])[0]
    held = client.submit(tasks.make_bytes, 100, workers=[address], pure=False)
    assert held.result(timeout=60) == b"x" * 100
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        sock = _dealer(ctx, address, _credentials(kind, target.security), "w")
        # A held key and a missing one: a served request gets a DataReply either way.
        _get_data(sock, [held.key, "no-such-key"])
        assert client.submit(tasks.inc, 1, pure=False).result(timeout=60) == 2
        assert _replies([sock], WATCH) == []
    finally:
        ctx.destroy(linger=0)
    assert client.submit(tasks.inc, 2, workers=[address], pure=False).result(60) == 3


def test_worker_data_port_serves_member_keys(target: Target) -> None:
    """Positive control for the data-port attack: a member gets the value."""
    client = target.client
    address = sorted(client.scheduler_info()["workers"])[0]
    held = client.submit(tasks.make_bytes, 100, workers=[address], pure=False)
    assert held.result(timeout=60) == b"x" * 100
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        sock = _dealer(ctx, address, _credentials("member-keys", target.security), "w")
        _get_data(sock, [held.key])
        msg, payload = _recv_message(sock)
        assert isinstance(msg, P.DataReply)
        [[key, ref]] = msg.values
        assert key == held.key
        assert serialize.loads(P.ref_frames(payload, ref)) == b"x" * 100
    finally:
        ctx.destroy(linger=0)


def test_client_with_wrong_keys_gets_no_answer(target: Target) -> None:
    """Client's own sockets with an unlisted key pair or a wrong server key time out
    with a message that points at the keys."""
    mine = Security.temporary()
    s = target.security
    for wrong in (
        Security(
            s.server_public, s.server_secret, mine.member_public, mine.member_secret
        ),
        Security(mine.server_public, s.server_secret, s.member_public, s.member_secret),
    ):
        with pytest.raises(TimeoutError, match="keys"):
            Client(target.address, security=wrong, timeout=3, set_as_default=False)
    assert target.client.submit(tasks.inc, 5, pure=False).result(timeout=60) == 6


class _RecordUnpickling:
    """Unpickling this appends the unpickling process's pid to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (_record_pid, (self.path,))


def _record_pid(path: str) -> None:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")


def test_broker_never_unpickles_payloads(cluster: LocalCluster, tmp_path: Path) -> None:
    """Even an authorised client cannot run code inside the broker: it forwards
    payloads unopened, so only the worker ever unpickles the argument."""
    path = tmp_path / "unpickled-by"
    with Client(cluster, set_as_default=False) as client:
        fut = client.submit(tasks.noop, _RecordUnpickling(str(path)), pure=False)
        assert fut.result(timeout=60) is None
        worker_pids = {w["pid"] for w in client.scheduler_info()["workers"].values()}
    pids = {int(line) for line in path.read_text().split()}
    assert pids, "the argument was never unpickled"
    assert cluster.broker_pid not in pids
    assert pids <= worker_pids


# ======================================================================================
# 2. credentials are required


def test_bare_address_client_raises_security_error(cluster: LocalCluster) -> None:
    with pytest.raises(SecurityError) as info:
        Client(cluster.scheduler_address, set_as_default=False)
    text = str(info.value)
    assert "scheduler_file=" in text
    assert "security=" in text


def test_zworker_without_credentials_exits_with_a_clear_message() -> None:
    done = _run_cli("zdist.worker", "tcp://127.0.0.1:9", "--no-nanny")
    assert done.returncode != 0
    assert "--security-file" in done.stderr
    assert "--scheduler-file" in done.stderr
    assert "Traceback" not in done.stderr


# ======================================================================================
# 3. the scheduler file


def test_zbroker_scheduler_file_is_private_and_complete(
    zbroker_cluster: ZbrokerCluster,
) -> None:
    f = zbroker_cluster.scheduler_file
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    data = json.loads(f.read_text())
    assert data["address"] == zbroker_cluster.address
    assert sorted(data["security"]) == sorted(KEY_FIELDS)
    # No temporary file is left beside it.
    assert sorted(p.name for p in f.parent.iterdir() if p.name.startswith(".")) == []


def test_write_private_json_refuses_world_writable_dir_without_sticky_bit(
    tmp_path: Path,
) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(SecurityError, match="world-writable"):
        write_private_json(open_dir / "s.json", {"a": 1})
    assert list(open_dir.iterdir()) == []

    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    write_private_json(sticky / "s.json", {"a": 1})
    assert stat.S_IMODE((sticky / "s.json").stat().st_mode) == 0o600

    # Overwriting a loose file leaves a private one.
    loose = tmp_path / "loose.json"
    loose.write_text("{}")
    loose.chmod(0o644)
    write_private_json(loose, {"b": 2})
    assert stat.S_IMODE(loose.stat().st_mode) == 0o600
    assert json.loads(loose.read_text()) == {"b": 2}


def test_zbroker_refuses_world_writable_scheduler_dir(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    done = _run_cli(
        "zdist.broker", "--port", "0", "--scheduler-file", str(open_dir / "s.json")
    )
    assert done.returncode != 0
    assert "world-writable" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "listening at" not in done.stdout
    assert list(open_dir.iterdir()) == []


def test_reading_a_loose_scheduler_file_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = tmp_path / "s.json"
    write_private_json(
        f, {"address": "tcp://127.0.0.1:9", "security": Security.temporary().to_dict()}
    )
    with caplog.at_level(logging.WARNING, logger="zdist.security"):
        Security.from_file(f)
    assert not caplog.records
    f.chmod(0o640)
    with caplog.at_level(logging.WARNING, logger="zdist.security"):
        Security.from_file(f)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "readable by other users" in record.getMessage()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file another's")
def test_scheduler_file_of_another_user_is_refused(tmp_path: Path) -> None:
    """A scheduler file planted by another user (e.g. in /tmp before the broker ran)
    names their broker and keys: using it would send our code and load their pickles."""
    f = tmp_path / "s.json"
    write_private_json(
        f, {"address": "tcp://127.0.0.1:9", "security": Security.temporary().to_dict()}
    )
    os.chown(f, 65534, 65534)
    with pytest.raises(SecurityError, match="another user"):
        read_json_file(f)
    with pytest.raises(SecurityError, match="another user"):
        Client(scheduler_file=str(f), set_as_default=False)
    done = _run_cli("zdist.broker", "--port", "0", "--scheduler-file", str(f))
    assert done.returncode != 0
    assert "another user" in done.stderr
    assert "Traceback" not in done.stderr
    done = _run_cli("zdist.worker", "--scheduler-file", str(f), "--no-nanny")
    assert done.returncode != 0
    assert "another user" in done.stderr
    assert "Traceback" not in done.stderr


# ======================================================================================
# 4. secrets stay out of ps, logs and reprs


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_no_secret_in_ps_output(cluster: LocalCluster) -> None:
    mine = [p for p in descendants(os.getpid()) if "zdist" in _cmdline(p)]
    # The broker, and per worker its supervisor and the worker process.
    assert cluster.broker_pid in mine
    assert len(mine) >= 1 + 2 * len(cluster.workers), [_cmdline(p) for p in mine]
    ps = subprocess.run(
        ["ps", "-eo", "args"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    assert "zdist" in ps
    for field in KEY_FIELDS:
        assert getattr(cluster.security, field) not in ps, field
    for pid in mine:
        for field in KEY_FIELDS:
            assert getattr(cluster.security, field) not in _cmdline(pid), field


def test_no_key_in_debug_logs(
    zbroker_cluster: ZbrokerCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Broker and worker at --log-level debug, after client and peer connections (and
    refused ones, from the attack tests when they ran first): no key in the logs."""
    zb = zbroker_cluster
    with Client(scheduler_file=str(zb.scheduler_file), set_as_default=False) as c:
        c.wait_for_workers(1, timeout=60)
        address = sorted(c.scheduler_info()["workers"])[0]
        held = c.submit(tasks.inc, 1, pure=False)
        assert held.result(timeout=60) == 2
        ctx: zmq.Context[Any] = zmq.Context()
        try:  # a peer connection to the worker's data port, as another worker makes
            sock = _dealer(ctx, address, _credentials("member-keys", zb.security), "w")
            _get_data(sock, [held.key])
            msg, _ = _recv_message(sock)
            assert isinstance(msg, P.DataReply)
            # and a refused one
            bad = _dealer(
                ctx, zb.address, _credentials("unlisted-keypair", zb.security), "c"
            )
            _send(bad, P.encode(P.RegisterClient("attacker", versions())))
            wait_for(
                lambda: "refused a CURVE connection" in zb.broker_log.read_text(),
                30,
                what="the broker to log the refusal",
            )
        finally:
            ctx.destroy(linger=0)
    broker_log = zb.broker_log.read_text()
    worker_log = zb.worker_log.read_text()
    assert " DEBUG " in broker_log and " DEBUG " in worker_log
    for field in KEY_FIELDS:
        key = getattr(zb.security, field)
        assert key not in broker_log, f"{field} in the broker's log"
        assert key not in worker_log, f"{field} in the worker's log"

    # In-process broker and worker (processes=False), every logger at debug level.
    caplog.set_level(logging.DEBUG)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as cluster:
        with Client(cluster, set_as_default=False) as c:
            assert c.submit(tasks.inc, 1).result(timeout=60) == 2
        keys = [getattr(cluster.security, f) for f in KEY_FIELDS]
    assert caplog.records
    for key in keys:
        assert key not in caplog.text


def test_security_repr_hides_secrets() -> None:
    sec = Security.temporary()
    config = WorkerConfig(address="tcp://127.0.0.1:9", security=sec)
    for text in (repr(sec), str(sec), f"{sec}", repr(config), str([sec])):
        assert sec.server_secret not in text
        assert sec.member_secret not in text
    assert "Security(" in repr(sec)


# ======================================================================================
# 5. the explicit opt-out


def test_local_cluster_without_security_warns_and_works(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.WARNING):
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, security=False)
    with cluster:
        assert any(
            r.levelno == logging.WARNING and "without security" in r.getMessage()
            for r in caplog.records
        )
        # The child broker says so too, on its (inherited) stderr.
        assert "security is OFF" in capfd.readouterr().err
        with Client(cluster, set_as_default=False) as c:
            assert c.submit(tasks.inc, 1).result(timeout=60) == 2


def test_zbroker_no_security_warns_and_works(tmp_path: Path) -> None:
    sched = tmp_path / "s.json"
    log = tmp_path / "broker.log"
    broker, _ = _start_zbroker(sched, "--port", "0", "--no-security", log=log)
    worker = None
    try:
        assert "security is OFF" in log.read_text()
        assert json.loads(sched.read_text())["security"] is None
        assert stat.S_IMODE(sched.stat().st_mode) == 0o600
        # Joining a plaintext broker takes the explicit opt-out too.
        refused = _run_cli("zdist.worker", "--scheduler-file", str(sched), "--no-nanny")
        assert refused.returncode != 0
        assert "--no-security" in refused.stderr
        assert "Traceback" not in refused.stderr
        worker = _start_zworker(
            "--scheduler-file", str(sched), "--no-security", log=tmp_path / "w.log"
        )
        with pytest.warns(UserWarning, match="without security"):
            c = Client(scheduler_file=str(sched), set_as_default=False)
        with c:
            c.wait_for_workers(1, timeout=60)
            assert c.submit(tasks.inc, 1).result(timeout=60) == 2
    finally:
        if worker is not None:
            _stop(worker)
        _stop(broker)


# ======================================================================================
# 6. a restarted broker keeps its address and keys


def test_zbroker_restart_reuses_address_and_keys(tmp_path: Path) -> None:
    sched = tmp_path / "s.json"
    log = tmp_path / "broker.log"
    broker, address = _start_zbroker(sched, "--port", "0", log=log)
    worker = None
    try:
        first = json.loads(sched.read_text())
        worker = _start_zworker("--scheduler-file", str(sched), log=tmp_path / "w.log")
        with Client(scheduler_file=str(sched), set_as_default=False) as c:
            assert c.submit(tasks.inc, 1).result(timeout=60) == 2
        _stop(broker)
        assert broker.returncode is not None

        broker, again = _start_zbroker(sched, log=log)
        second = json.loads(sched.read_text())
        assert again == address == second["address"]
        assert second["security"] == first["security"]
        assert second["pid"] == broker.pid != first["pid"]
        assert stat.S_IMODE(sched.stat().st_mode) == 0o600
        # The worker started before the restart comes back with the same keys, and a
        # client made from the file works.
        with Client(scheduler_file=str(sched), set_as_default=False) as c:
            c.wait_for_workers(1, timeout=60)
            assert c.submit(tasks.inc, 2).result(timeout=60) == 3
    finally:
        if worker is not None:
            _stop(worker)
        _stop(broker)
