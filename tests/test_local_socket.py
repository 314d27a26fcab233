"""Same-host peers on a Unix socket: only the broker's own user gets in.

A LocalCluster's workers and ``Client(cluster)`` talk to the broker over a Unix socket
(``ipc://``) in a directory only its owner can enter, instead of CurveZMQ over TCP; the
broker's ZAP handler also refuses any peer whose user id (from the kernel) is not its
own. The attacks here connect as another user (``nobody``, from a forked child that
drops root) and send the same well-formed messages as test_security's attackers; a
positive control sends them as the broker's own user and sees them served.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tasks
import zmq
from test_security import (
    WATCH,
    _alive,
    _register_worker,
    _start_zbroker,
    _start_zworker,
    _stop,
    _submit_markers,
)
from utils import descendants, wait_for

from zdist import Client, LocalCluster
from zdist import protocol as P
from zdist._version import versions
from zdist.client import local
from zdist.errors import SecurityError, ZdistError
from zdist.localsocket import (
    CURVE_DOMAIN,
    LOCAL_DOMAIN,
    bind_local_socket,
    check_local_socket,
    null_peer_allowed,
    user_socket_dir,
)
from zdist.security import Security
from zdist.worker.worker import Worker, WorkerConfig

pytestmark = pytest.mark.timeout(120)

NOBODY = 65534
REFUSED = "refused a local-socket connection"


def _require_root() -> None:
    """Connecting as another user needs root (to drop to it); CI runs as root."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but not root: the other-user attacks cannot run")
        pytest.skip("needs root to connect as another user")


# ======================================================================================
# the ZAP rule and the bind checks, without a broker


def test_null_peer_rule_admits_only_our_uid_on_the_local_domain() -> None:
    me = os.geteuid()
    assert null_peer_allowed(LOCAL_DOMAIN, f"localhost:{me}:0:123".encode())
    assert null_peer_allowed(LOCAL_DOMAIN, f":{me}:5:9".encode())
    assert not null_peer_allowed(LOCAL_DOMAIN, f"localhost:{me + 1}:0:123".encode())
    assert not null_peer_allowed(LOCAL_DOMAIN, b"localhost:abc:0:1")
    # No credentials in the address (TCP, or a libzmq without SO_PEERCRED): refused.
    assert not null_peer_allowed(LOCAL_DOMAIN, b"127.0.0.1")
    assert not null_peer_allowed(LOCAL_DOMAIN, b"")
    # Unencrypted peers on any other listener: refused whatever the address says.
    assert not null_peer_allowed(CURVE_DOMAIN, f"localhost:{me}:0:1".encode())
    assert not null_peer_allowed(b"", f"localhost:{me}:0:1".encode())


@pytest.fixture
def router() -> Iterator[zmq.Socket[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    yield sock
    ctx.destroy(linger=0)


def test_bind_refuses_a_directory_others_can_enter(
    router: zmq.Socket[Any], tmp_path: Path
) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o755)
    with pytest.raises(SecurityError, match="closed to others"):
        bind_local_socket(router, str(d / "b.sock"), zap=True)
    assert not (d / "b.sock").exists()


def test_bind_refuses_a_directory_of_another_user(
    router: zmq.Socket[Any], tmp_path: Path
) -> None:
    _require_root()
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(SecurityError, match="belong to you"):
        bind_local_socket(router, str(d / "b.sock"), zap=False)


def test_bind_refuses_bad_paths_and_curve_first(
    router: zmq.Socket[Any], tmp_path: Path
) -> None:
    with pytest.raises(SecurityError, match="absolute"):
        bind_local_socket(router, "relative.sock", zap=False)
    with pytest.raises(SecurityError, match="107 bytes"):
        bind_local_socket(router, "/tmp/" + "x" * 120, zap=False)
    Security.temporary().configure_server(router)
    with pytest.raises(SecurityError, match="before CurveZMQ"):
        bind_local_socket(router, str(tmp_path / "b.sock"), zap=False)


def test_bind_makes_the_socket_owner_only(
    router: zmq.Socket[Any], tmp_path: Path
) -> None:
    d = tmp_path / "private"
    d.mkdir(mode=0o700)
    address = bind_local_socket(router, str(d / "b.sock"), zap=True)
    assert address == f"ipc://{d}/b.sock"
    assert stat.S_IMODE((d / "b.sock").stat().st_mode) == 0o600


def test_bind_never_removes_a_file_or_a_live_socket(
    router: zmq.Socket[Any], tmp_path: Path
) -> None:
    """libzmq unlinks whatever is at an ipc path before it binds."""
    d = tmp_path / "private"
    d.mkdir(mode=0o700)
    precious = d / "precious.txt"
    precious.write_text("data")
    with pytest.raises(SecurityError, match="not a socket of yours"):
        bind_local_socket(router, str(precious), zap=False)
    assert precious.read_text() == "data"
    bind_local_socket(router, str(d / "b.sock"), zap=False)
    other = router.context.socket(zmq.ROUTER)
    try:
        with pytest.raises(SecurityError, match="another broker is listening"):
            bind_local_socket(other, str(d / "b.sock"), zap=False)
    finally:
        other.close(linger=0)


def test_bind_replaces_a_stale_socket(router: zmq.Socket[Any], tmp_path: Path) -> None:
    d = tmp_path / "private"
    d.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(d / "b.sock"))
    stale.close()  # the file stays, nobody listens: a broker that died
    assert bind_local_socket(router, str(d / "b.sock"), zap=False)
    peer = router.context.socket(zmq.DEALER)
    peer.linger = 0
    peer.connect(f"ipc://{d}/b.sock")
    peer.send(b"hello")
    assert router.poll(10_000)
    assert router.recv_multipart()[1] == b"hello"
    peer.close()


def test_clients_and_workers_refuse_a_socket_others_could_have_made(
    tmp_path: Path,
) -> None:
    """Over TCP, CurveZMQ's server key proves who listens; on a Unix socket only the
    file system can: in a directory others can write, a socket there might be theirs
    (and would receive our code and data)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # world-writable, no sticky bit
    mine = shared / "mine"
    mine.mkdir(mode=0o700)
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    sec = Security.temporary()
    for address, why in (
        (f"ipc://{mine}/b.sock", "another user can rename"),
        (f"ipc://{open_dir}/b.sock", "closed to others"),
    ):
        with pytest.raises(SecurityError, match=why):
            check_local_socket(address)
        with pytest.raises(SecurityError, match=why):
            Client(address, security=sec, set_as_default=False, timeout=5)
        with pytest.raises(SecurityError, match=why):
            Worker(WorkerConfig(address=address, security=sec))
        done = subprocess.run(
            [sys.executable, "-m", "zdist.worker", address, "--no-security"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0 and why in done.stderr, done.stderr


def test_a_socket_of_another_user_is_refused(tmp_path: Path) -> None:
    _require_root()
    d = tmp_path / "private"
    d.mkdir(mode=0o700)
    theirs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        theirs.bind(str(d / "b.sock"))
        os.chown(d / "b.sock", NOBODY, NOBODY)
        with pytest.raises(SecurityError, match="not a socket of yours"):
            check_local_socket(f"ipc://{d}/b.sock")
    finally:
        theirs.close()


# ======================================================================================
# LocalCluster


def test_local_cluster_uses_a_private_socket() -> None:
    with LocalCluster(n_workers=1, threads_per_worker=1) as cluster:
        local = cluster.local_address
        assert local is not None and local.startswith("ipc://")
        path = Path(local[len("ipc://") :])
        assert path.parent.name == f"zdist-sockets-{os.geteuid()}"
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        # TCP stays what dask users see, secured with CurveZMQ.
        assert cluster.scheduler_address.startswith("tcp://")
        with Client(cluster, set_as_default=False) as c:
            assert c._conn.address == local
            assert c.scheduler_address == cluster.scheduler_address
            assert c.submit(tasks.inc, 1).result(timeout=60) == 2
            # Its workers too (they would fall back to nothing silently).
            where = c.run(tasks.broker_address_of_worker)
            assert list(where.values()) == [local]
        # And over TCP, with the cluster's keys.
        with Client(
            cluster.scheduler_address, security=cluster.security, set_as_default=False
        ) as c:
            assert c.submit(tasks.inc, 2).result(timeout=60) == 3
    # The socket goes; the directory stays, so that nobody else can take its name
    # while peers of ours may still try to reconnect there.
    assert not path.exists()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_local_cluster_protocol_tcp_has_no_socket() -> None:
    with LocalCluster(n_workers=1, threads_per_worker=1, protocol="tcp://") as cluster:
        assert cluster.local_address is None
        with Client(cluster, set_as_default=False) as c:
            assert c._conn.address == cluster.scheduler_address
            assert c.submit(tasks.inc, 1).result(timeout=60) == 2


def test_local_cluster_on_another_host_uses_tcp() -> None:
    """Other machines are to reach it (workers' data ports included)."""
    assert local._use_local_socket(None, True, "127.0.0.1")
    assert local._use_local_socket(None, True, None)
    assert not local._use_local_socket(None, True, "10.1.2.3")
    assert not local._use_local_socket(None, True, "0.0.0.0")
    assert not local._use_local_socket("tcp", True, "127.0.0.1")
    assert not local._use_local_socket(None, False, "127.0.0.1")


def test_failed_start_leaves_no_socket() -> None:
    d = user_socket_dir()
    assert d is not None
    before = set(os.listdir(d))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ZdistError, match="did not start"):
            LocalCluster(n_workers=1, scheduler_port=port, timeout=30)
    assert set(os.listdir(d)) <= before


def test_the_broker_removes_its_socket_when_its_parent_dies(tmp_path: Path) -> None:
    """SIGKILL leaves no finalizer to run: the broker's lifeline cleans up."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from zdist import LocalCluster\n"
        "c = LocalCluster(n_workers=1, threads_per_worker=1)\n"
        "print(c.local_address, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        assert address.startswith("ipc://"), address
        path = Path(address[len("ipc://") :])
        assert path.exists()
        children = descendants(proc.pid)
        assert children
    finally:
        proc.kill()
        proc.wait()
    wait_for(lambda: not path.exists(), 60, what="the socket to go")
    wait_for(
        lambda: not any(_alive(p) for p in children), 60, what="the children to exit"
    )


def test_user_socket_dir_skips_a_directory_someone_else_planted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _require_root()
    base = tmp_path / "tmp"
    base.mkdir(mode=0o755)
    planted = base / f"zdist-sockets-{os.geteuid()}"
    planted.mkdir(mode=0o700)
    os.chown(planted, NOBODY, NOBODY)
    monkeypatch.setattr(tempfile, "tempdir", str(base))
    # The fallback, not the planted one.
    assert user_socket_dir() == f"/tmp/zdist-sockets-{os.geteuid()}"


def test_user_socket_dir_falls_back_to_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", "/nonexistent/zdist-test")
    assert user_socket_dir() == f"/tmp/zdist-sockets-{os.geteuid()}"


def test_no_safe_directory_means_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "user_socket_dir", lambda: None)
    with LocalCluster(n_workers=1, threads_per_worker=1) as cluster:
        assert cluster.local_address is None
        with Client(cluster, set_as_default=False) as c:
            assert c.submit(tasks.inc, 1).result(timeout=60) == 2
    with pytest.raises(ZdistError, match="no safe directory"):
        LocalCluster(n_workers=0, protocol="ipc")


def test_a_symlinked_path_is_resolved_before_connecting(tmp_path: Path) -> None:
    """A link's owner could repoint it after the check: connect to its target."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert check_local_socket(f"ipc://{link}/b.sock") == f"ipc://{real}/b.sock"


@pytest.mark.parametrize(
    "protocol, processes, match",
    [
        ("ucx", True, "supports 'tcp' and 'ipc'"),
        ("inproc://", True, "needs processes=False"),
        ("ipc", False, "needs processes=True"),
    ],
)
def test_local_cluster_refuses_other_protocols(
    protocol: str, processes: bool, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        LocalCluster(n_workers=0, processes=processes, protocol=protocol)


def test_zbroker_refuses_a_local_socket_in_an_open_directory(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o755)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "zdist.broker", "--no-security", "--port", "0"),
            *("--dashboard-address", "none", "--local-socket", str(d / "b.sock")),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "closed to others (chmod 700)" in done.stderr
    assert "listening at" not in done.stdout


# ======================================================================================
# attacks on a live broker's local socket


@dataclass
class LocalBroker:
    local: str
    socket_dir: Path
    client: Client
    log: Path
    broker: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def local_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """``zbroker --local-socket`` with security on, and a ``zworker`` that reaches it
    through that socket (so a task admitted there would run)."""
    d = tmp_path_factory.mktemp("local-broker")
    # Directly under /tmp (mkdtemp: mode 0700), not under pytest's own private
    # directory, which would keep another user out before the socket's checks do.
    socket_dir = Path(tempfile.mkdtemp(prefix="zdist-test-"))
    sched = d / "scheduler.json"
    log = d / "broker.log"
    broker, _ = _start_zbroker(
        sched,
        "--port",
        "0",
        "--dashboard-address",
        "none",
        "--local-socket",
        str(socket_dir / "b.sock"),
        log=log,
    )
    local = f"ipc://{socket_dir}/b.sock"
    worker = _start_zworker(
        local, "--security-file", str(sched), "--name", "local", log=d / "worker.log"
    )
    try:
        with Client(
            local, security=Security.from_file(sched), set_as_default=False
        ) as c:
            c.wait_for_workers(1, timeout=60)
            yield LocalBroker(local, socket_dir, c, log, broker)
    finally:
        _stop(worker)
        _stop(broker)
        shutil.rmtree(socket_dir, ignore_errors=True)


def _in_child(uid: int | None, body: Callable[[], str]) -> str:
    """Run ``body`` in a forked child (as ``uid``; None: as we are) with no pytest and
    no inherited ZeroMQ state, and return what it returned."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            os.write(w, body().encode())
            code = 0
        finally:
            os._exit(code)  # no cleanup: the parent's state is not ours
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
    return out


def _attack_as(uid: int | None, address: str, markers: list[Path]) -> int:
    """Send a client's and a worker's messages to ``address`` as ``uid`` (None: as
    we are); the number of replies that came within WATCH s."""
    submit, payload = _submit_markers(markers)
    messages = [
        P.encode(P.RegisterClient("attacker", versions())),
        P.encode(submit, payload),
        P.encode(P.InfoRequest(1, "scheduler_info")),
    ]
    as_worker = [P.encode(_register_worker([])), P.encode(P.Heartbeat({}))]

    def attack() -> str:
        ctx: zmq.Context[Any] = zmq.Context()
        poller = zmq.Poller()
        for role, batch in (("c", messages), ("w", as_worker)):
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            s.identity = f"{role}-attacker-{os.getpid()}".encode()
            s.connect(address)
            for frames in batch:
                try:
                    s.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:  # no connection: the message is lost
                    pass
            poller.register(s, zmq.POLLIN)
        got = 0
        for s, _ in poller.poll(WATCH * 1000):
            s.recv_multipart()
            got += 1
        ctx.destroy(linger=0)
        return str(got)

    return int(_in_child(uid, attack))


def _connect_as(uid: int, address: str) -> str:
    """A raw AF_UNIX connect() as ``uid``: "ok" or the name of the error it got."""

    def connect() -> str:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(address[len("ipc://") :])
            return "ok"
        except OSError as exc:
            return type(exc).__name__

    return _in_child(uid, connect)


def _still_serves(lb: LocalBroker) -> None:
    futures = lb.client.map(tasks.inc, range(10), pure=False)
    assert lb.client.gather(futures) == list(range(1, 11))
    assert lb.broker.poll() is None
    names = [w["name"] for w in lb.client.scheduler_info()["workers"].values()]
    assert names == ["local"]


def test_another_user_cannot_reach_the_local_socket(
    local_broker: LocalBroker, tmp_path: Path
) -> None:
    """The first lock: the directory. Another user cannot even connect, so the
    broker's uid check never sees them."""
    _require_root()
    tmp_path.chmod(0o777)  # so that markers could be written, were a task admitted
    markers = [tmp_path / "touched", tmp_path / "lambda-ran"]
    refusals = local_broker.log.read_text().count(REFUSED)
    assert _connect_as(NOBODY, local_broker.local) == "PermissionError"
    assert _attack_as(NOBODY, local_broker.local, markers) == 0
    _still_serves(local_broker)
    assert not any(m.exists() for m in markers), "another user's task ran"
    assert local_broker.log.read_text().count(REFUSED) == refusals


def test_zap_refuses_another_user_even_through_an_open_directory(
    local_broker: LocalBroker, tmp_path: Path
) -> None:
    """The second lock: with the directory and socket opened up by mistake, the
    broker still refuses a peer whose kernel-reported uid is not its own."""
    _require_root()
    tmp_path.chmod(0o777)
    markers = [tmp_path / "touched", tmp_path / "lambda-ran"]
    sock = local_broker.socket_dir / "b.sock"
    local_broker.socket_dir.chmod(0o755)
    sock.chmod(0o666)
    try:
        assert _attack_as(NOBODY, local_broker.local, markers) == 0
    finally:
        local_broker.socket_dir.chmod(0o700)
        sock.chmod(0o600)
    _still_serves(local_broker)
    assert not any(m.exists() for m in markers), "another user's task ran"
    wait_for(
        lambda: REFUSED in local_broker.log.read_text(),
        30,
        what="the broker to log the refusal",
    )


def test_our_own_user_is_served_on_the_local_socket(
    local_broker: LocalBroker, tmp_path: Path
) -> None:
    """Positive control: the attacker's child, not dropping its user, gets replies
    and its tasks run (so the refusals above are the user id's doing)."""
    markers = [tmp_path / "touched", tmp_path / "lambda-ran"]
    assert _attack_as(None, local_broker.local, markers) >= 1
    wait_for(lambda: all(m.exists() for m in markers), 60, what="the probe's tasks")


def test_sweep_removes_only_old_sockets_nobody_listens_on(tmp_path: Path) -> None:
    from zdist.localsocket import STALE_AFTER, sweep_stale

    tmp_path.chmod(0o700)

    def unix_socket(name: str, listen: bool) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(tmp_path / name))
        if listen:
            s.listen(1)
        return s

    dead_old = unix_socket("dead-old.sock", listen=False)
    dead_old.close()
    dead_young = unix_socket("dead-young.sock", listen=False)
    dead_young.close()
    live_old = unix_socket("live-old.sock", listen=True)
    (tmp_path / "file-old.sock").write_text("not a socket")
    old = os.stat(tmp_path / "dead-young.sock").st_mtime - STALE_AFTER - 5
    for name in ("dead-old.sock", "live-old.sock", "file-old.sock"):
        os.utime(tmp_path / name, (old, old))
    try:
        assert sweep_stale(str(tmp_path)) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "dead-young.sock",
            "file-old.sock",
            "live-old.sock",
        ]
    finally:
        live_old.close()
