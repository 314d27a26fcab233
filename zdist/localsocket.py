"""A broker's Unix socket, for peers on its own host (``ipc:///path``).

A LocalCluster's workers and ``Client(cluster)`` reach their broker here instead of over
TCP: nothing crosses a network, and it skips CurveZMQ's work on every message, most of
what security costs a round trip. CurveZMQ proves who is who over TCP; here the file
system and the kernel do:

- the socket (0600) lives in a directory that is ours and closed to everyone else, and
  no directory above it can be changed by another user (checked by the broker before
  it binds, and by every client and worker before it connects: whoever can create the
  socket file would receive their code and data). LocalCluster keeps one such
  directory per user and never removes it (:func:`user_socket_dir`): ZeroMQ peers
  reconnect to a path on their own, and a removed directory's name could be taken
  by another user;
- with security on, the broker's ZAP handler admits an unencrypted peer only on this
  listener and only with our user id, as the kernel reports it (zdist.security);
- ``zap_enforce_domain`` makes libzmq refuse, rather than admit, a peer when no ZAP
  handler answers.

A worker's door (zdist.worker.door) is a plain Unix socket in the same directory,
checked the same way before connecting; there each end checks the other's user id
itself (``SO_PEERCRED``, zdist.datagram).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

import zmq

from zdist.errors import SecurityError
from zdist.net import IPC, MAX_IPC_PATH, ipc_path

logger = logging.getLogger(__name__)

#: ZAP domains (zmq_setsockopt ZMQ_ZAP_DOMAIN) of a broker's local socket, and of its
#: TCP listener bound after it (libzmq fixes a listener's options when it binds).
LOCAL_DOMAIN = b"zdist-local"
CURVE_DOMAIN = b"zdist"


def null_peer_allowed(domain: bytes, address: bytes, uid: int | None = None) -> bool:
    """Whether an unencrypted connection may in: only on the local-socket domain, and
    only from our own user. libzmq gives a Unix-socket peer's address as
    ``...:uid:gid:pid`` from the kernel (SO_PEERCRED); anything else is refused."""
    if domain != LOCAL_DOMAIN:
        return False
    parts = address.rsplit(b":", 3)
    if len(parts) != 4 or not parts[1].isdigit():
        return False
    return int(parts[1]) == (os.geteuid() if uid is None else uid)


def check_private_dir(directory: str | os.PathLike[str]) -> None:
    """Raise SecurityError unless ``directory`` is ours, closed to others, and no
    directory above it lets another user rename or replace what it holds."""
    real = Path(os.path.realpath(directory))
    me = os.geteuid()
    try:
        st = real.stat()
    except OSError as exc:
        raise SecurityError(f"local socket directory {real}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != me or st.st_mode & 0o077:
        raise SecurityError(
            f"refusing a local socket in {real}: the directory must belong to you and "
            f"be closed to others (chmod 700)"
        )
    for above in real.parents:
        st = above.stat()
        open_to_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if st.st_uid not in (0, me) or (
            open_to_others and not st.st_mode & stat.S_ISVTX
        ):
            raise SecurityError(
                f"refusing a local socket under {above}: another user can rename or "
                f"replace what it holds"
            )


def path_of(address: str) -> str:
    return address[len(IPC) :]


def check_local_socket(address: str) -> str:
    """Before connecting to ``ipc://PATH``: only we can have made PATH. Over TCP the
    broker's CurveZMQ key proves who listens; here, a socket planted by another user
    would receive our code and data. Returns the address with symbolic links
    resolved, to connect to (a link's owner could repoint it later). The socket
    itself may not exist yet (a worker started before its broker), its directory
    must: then only we can create the socket later."""
    path = ipc_path(address)
    if path is None:
        raise SecurityError(
            f"{address}: need an absolute path of at most {MAX_IPC_PATH} bytes"
        )
    directory = os.path.realpath(os.path.dirname(path))
    check_private_dir(directory)
    path = os.path.join(directory, os.path.basename(path))
    if len(os.fsencode(path)) > MAX_IPC_PATH:
        raise SecurityError(f"{address}: {path} is over {MAX_IPC_PATH} bytes")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return IPC + path
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
        raise SecurityError(f"refusing {address}: not a socket of yours")
    return IPC + path


def user_socket_dir() -> str | None:
    """This user's directory for local sockets, made if need be and never removed:
    ``zdist-sockets-UID`` in the temporary directory (or in /tmp, when that one is
    refused or too long for a socket path); None if neither is safe."""
    uid = os.geteuid()
    bases = [os.path.realpath(tempfile.gettempdir()), "/tmp"]
    for base in dict.fromkeys(bases):
        d = os.path.join(base, f"zdist-sockets-{uid}")
        if len(os.fsencode(d)) > MAX_IPC_PATH - 40:  # room for a socket name
            continue
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            with contextlib.suppress(OSError):
                st = os.lstat(d)
                if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
                    os.chmod(d, 0o700)  # ours; what others left is never used
        except OSError:
            continue
        try:
            check_private_dir(d)
        except SecurityError as exc:
            logger.warning("not using %s for local sockets: %s", d, exc)
            continue
        return d
    return None


def bind_local_socket(sock: zmq.Socket[Any], path: str, zap: bool) -> str:
    """Listen on a Unix socket at ``path`` and return its ``ipc://`` address. Call it
    before any CurveZMQ option is set on ``sock``. ``zap``: security is on, so the ZAP
    handler checks every peer's user id.

    A stale socket left at ``path`` (nobody listening) is replaced; a live one, or
    anything that is not a socket, is refused (libzmq would silently unlink it).
    """
    if sock.get(zmq.CURVE_SERVER):
        raise SecurityError("bind the local socket before CurveZMQ is configured")
    address = check_local_socket(IPC + path)
    path = path_of(address)
    if os.path.lexists(path):
        _remove_stale(path)
    if zap:
        sock.zap_domain = LOCAL_DOMAIN
        sock.zap_enforce_domain = 1
    sock.bind(address)
    os.chmod(path, 0o600)
    if zap:
        sock.zap_domain = CURVE_DOMAIN  # for what binds next (libzmq takes no b"")
    return address


def _remove_stale(path: str) -> None:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1)  # a stopped broker's full backlog would block a connect
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno != errno.ECONNREFUSED:
            raise SecurityError(
                f"local socket {path}: {exc.strerror or exc}; is a broker there?"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a socket nobody listens on: left by a broker that died
        return
    finally:
        probe.close()
    raise SecurityError(f"local socket {path}: another broker is listening there")


#: A socket file this old (seconds) that nobody listens on is a killed process's.
STALE_AFTER = 60.0


def sweep_stale(directory: str, now: float | None = None) -> int:
    """Remove sockets of ours in ``directory`` that nobody has listened on for a
    while: left by a process that was killed (a clean exit removes its own). A
    young one may be one that is being bound, so only old ones are probed. Returns
    how many went."""
    import time

    now = time.time() if now is None else now
    removed = 0
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if not entry.name.endswith(".sock"):
                continue
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if (
                    stat.S_ISSOCK(st.st_mode)
                    and st.st_uid == os.geteuid()
                    and now - st.st_mtime > STALE_AFTER
                    and not _listening(entry.path)
                ):
                    os.unlink(entry.path)
                    removed += 1
    return removed


def _listening(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:  # EAGAIN: a full backlog is someone listening
        return True
    finally:
        probe.close()
    return True


def remove_socket(address: str) -> None:
    """At the broker's exit: its socket file, if it is still one of ours. The
    directory stays (see :func:`user_socket_dir`)."""
    path = path_of(address)
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid():
            os.unlink(path)
