"""CurveZMQ credentials for a cluster, and the scheduler file that carries them.

A cluster has two key pairs. The *server* pair belongs to whatever accepts connections
(the broker's ROUTER and every worker's data port); the *member* pair is held by every
client and worker. Servers run a ZAP handler that admits only the member public key, so
knowing the broker's public key is not enough to connect: a peer needs the member
secret, which lives only in memory, in a child's stdin, or in a 0600 scheduler or
security file.

Peers on the broker's own host may instead connect to a Unix socket (``ipc://``, see
zdist.localsocket), as LocalCluster's do; the ZAP handler here admits an unencrypted
connection only there, and only from the broker's own user id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth.thread

from zdist.errors import SecurityError
from zdist.localsocket import CURVE_DOMAIN, null_peer_allowed

logger = logging.getLogger(__name__)
#: pyzmq's authenticator logs every client's public key at debug level; keys stay out
#: of logs (a debug log is often pasted into a bug report), so its debug records go.
_zap_logger = logging.getLogger(__name__ + ".zap")
_zap_logger.addFilter(lambda record: record.levelno > logging.DEBUG)

_FIELDS = ("server_public", "server_secret", "member_public", "member_secret")


@dataclass(frozen=True, repr=False)
class Security:
    """The cluster's keys (z85 text). ``repr`` never shows secrets."""

    server_public: str
    server_secret: str
    member_public: str
    member_secret: str

    def __repr__(self) -> str:
        return f"Security(server_public={self.server_public[:8]}..., secrets hidden)"

    @classmethod
    def temporary(cls) -> Security:
        """Fresh keys, made in memory (dask's ``Security.temporary`` name)."""
        server_public, server_secret = zmq.curve_keypair()
        member_public, member_secret = zmq.curve_keypair()
        return cls(
            server_public.decode(),
            server_secret.decode(),
            member_public.decode(),
            member_secret.decode(),
        )

    @classmethod
    def from_dict(cls, data: Any) -> Security:
        if not isinstance(data, dict) or not all(
            isinstance(data.get(f), str) and len(data[f]) == 40 for f in _FIELDS
        ):
            raise SecurityError("credentials must hold four 40-character z85 keys")
        return cls(*(data[f] for f in _FIELDS))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Security:
        """Read keys from a security file or a scheduler file (``security`` member)."""
        data = read_json_file(path)
        sec = data.get("security", data)
        if sec is None:
            raise SecurityError(f"{path} says the cluster runs without security")
        return cls.from_dict(sec)

    def to_dict(self) -> dict[str, str]:
        return {f: getattr(self, f) for f in _FIELDS}

    # --- sockets ----------------------------------------------------------------------

    def configure_server(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_secretkey = self.server_secret.encode()
        sock.curve_publickey = self.server_public.encode()
        sock.curve_server = True

    def configure_client(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_serverkey = self.server_public.encode()
        sock.curve_publickey = self.member_public.encode()
        sock.curve_secretkey = self.member_secret.encode()

    def start_authenticator(
        self, ctx: zmq.Context[Any]
    ) -> zmq.auth.thread.ThreadAuthenticator:
        """A ZAP handler on ``ctx`` admitting only the member key (an allow-list) over
        CurveZMQ, and only this user over a local socket."""
        auth = _Authenticator(ctx, log=_zap_logger)
        auth.start()
        members = _MemberOnly(self)
        # "*": listeners with no ZAP domain; CURVE_DOMAIN: a broker's TCP listener
        # bound after its local socket (zdist.localsocket).
        for domain in ("*", CURVE_DOMAIN.decode()):
            auth.configure_curve_callback(domain, credentials_provider=members)
        return auth


class _MemberOnly:
    def __init__(self, security: Security) -> None:
        self._key = security.member_public.encode()

    def callback(self, domain: str, key: bytes) -> bool:
        ok = (
            zmq.utils.z85.encode(key) == self._key
            if len(key) == 32
            else key == self._key
        )
        if not ok:
            logger.warning("refused a CURVE connection from an unknown key")
        return ok


class _Authenticator(zmq.auth.thread.ThreadAuthenticator):
    """pyzmq's handler admits any unencrypted (NULL) connection it has no address
    rule for; here only a local-socket peer running as this user gets in."""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) >= 6 and msg[5] == b"NULL":
            ok = msg[0] == b"1.0" and null_peer_allowed(msg[2], msg[3])
            if not ok:
                logger.warning("refused a local-socket connection from %r", msg[3])
            status = [b"200", b"OK"] if ok else [b"400", b"not this user"]
            self.zap_socket.send_multipart([msg[0], msg[1], *status, b"", b""])
            return
        await super().handle_zap_message(msg)


def read_security_stream(stream: Any = None) -> Security | None:
    """Read one JSON line of credentials (``null`` for none) from ``stream`` (stdin)."""
    line = (stream or sys.stdin.buffer).readline()
    if not line:
        raise SecurityError("expected credentials on standard input, got end of file")
    data = json.loads(line)
    return None if data is None else Security.from_dict(data)


def read_json_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a scheduler or security file; refuse one that another user owns.

    Whoever writes a scheduler file chooses the broker a client sends code to and whose
    pickled results it loads, so a file planted by another user (say in ``/tmp``
    before the broker wrote its own) would run their code as us.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            st = os.fstat(f.fileno())
            text = f.read()
    except FileNotFoundError:
        raise SecurityError(f"scheduler/security file {p} does not exist") from None
    except OSError as exc:
        raise SecurityError(f"cannot read {p}: {exc.strerror}") from None
    if st.st_uid != os.geteuid():
        raise SecurityError(
            f"refusing to use {p}: it belongs to another user (uid {st.st_uid}), "
            f"who could point you at their own broker; use a file you created"
        )
    try:
        data = json.loads(text)
    except ValueError:
        raise SecurityError(f"{p} is not a zdist scheduler or security file") from None
    if not isinstance(data, dict):
        raise SecurityError(f"{p} is not a zdist scheduler or security file")
    if st.st_mode & (stat.S_IRGRP | stat.S_IROTH) and data.get("security"):
        logger.warning(
            "%s holds cluster keys and is readable by other users: chmod 600 it", p
        )
    return data


def write_private_json(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to a file only its owner can read (mode 0600).

    Refuses a world-writable directory without the sticky bit, where another user could
    replace the file between our write and a reader's open.
    """
    p = Path(path).absolute()
    parent = p.parent
    parent.mkdir(parents=True, exist_ok=True)
    pmode = parent.stat().st_mode
    if pmode & stat.S_IWOTH and not pmode & stat.S_ISVTX:
        raise SecurityError(
            f"refusing to write {p}: {parent} is world-writable without the sticky bit"
        )
    try:
        # mkstemp: a fresh name, O_EXCL and mode 0600, so nobody can plant the
        # temporary file (or a symlink in its place) before we write.
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(data, indent=2).encode())
            os.replace(tmp, p)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise SecurityError(f"cannot write {p}: {exc.strerror or exc}") from None


def wait_for_scheduler_file(
    path: str | os.PathLike[str], timeout: float | None
) -> dict[str, Any]:
    """Read a scheduler file, waiting for it to appear: in a batch job, clients and
    workers often start before the broker has written it (dask does the same)."""
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    announced = False
    while not os.path.exists(path):
        if deadline is not None and time.monotonic() > deadline:
            raise SecurityError(
                f"scheduler file {path} did not appear within {timeout} s"
            )
        if not announced:
            logger.info("waiting for scheduler file %s", path)
            announced = True
        time.sleep(0.1)  # polling a shared filesystem; inotify does not see NFS writes
    return read_json_file(path)
