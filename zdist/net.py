"""Addresses: interfaces to IPs, the local IP that reaches a peer, and the two kinds of
broker address (``tcp://host:port``, and ``ipc:///path`` for same-host peers)."""

from __future__ import annotations

import fcntl
import os
import socket
import struct

from zdist.errors import ZdistError

_SIOCGIFADDR = 0x8915


def interface_ip(name: str) -> str:
    """The IPv4 address of network interface ``name`` (e.g. ``ib0``)."""
    names = [n for _, n in socket.if_nameindex()]
    if name not in names:
        raise ZdistError(
            f"network interface {name!r} does not exist here; available: "
            f"{', '.join(names)}"
        )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(
                s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15])
            )
        except OSError:
            raise ZdistError(
                f"network interface {name!r} has no IPv4 address"
            ) from None
    return socket.inet_ntoa(packed[20:24])


def local_ip_towards(host: str) -> str:
    """The local address this machine uses to reach ``host`` (no packet is sent)."""
    if host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return str(s.getsockname()[0])
    except OSError:
        return socket.gethostbyname(socket.gethostname())


IPC = "ipc://"
#: The longest path a Unix socket can have (sun_path is 108 bytes with its NUL).
MAX_IPC_PATH = 107


def is_ipc(address: str) -> bool:
    """Whether ``address`` is a Unix socket on this host (``ipc:///path``): the kernel
    checks who connects to it, so it carries no CurveZMQ (see zdist.security)."""
    return address.startswith(IPC)


def ipc_path(address: str) -> str | None:
    """The path of ``ipc:///path``, or None unless it is absolute and fits a Unix
    socket."""
    path = address[len(IPC) :]
    if (
        not path.startswith("/")
        or "\x00" in path
        or len(os.fsencode(path)) > MAX_IPC_PATH
    ):
        return None
    return path


def split_address(address: str) -> tuple[str, int]:
    """``tcp://host:port`` -> (host, port), with a clear error for anything else;
    ``ipc:///path`` (same host) -> ("127.0.0.1", 0)."""
    if isinstance(address, str) and is_ipc(address):
        if ipc_path(address) is None:
            raise ZdistError(
                f"expected an address like ipc:///absolute/path (at most "
                f"{MAX_IPC_PATH} bytes), got {address!r}"
            )
        return "127.0.0.1", 0
    if not isinstance(address, str) or not address.startswith("tcp://"):
        raise ZdistError(
            f"expected an address like tcp://host:port or ipc:///path, got {address!r}"
        )
    host, _, port = address[len("tcp://") :].rpartition(":")
    if not host or not port.isdigit():
        raise ZdistError(f"expected an address like tcp://host:port, got {address!r}")
    return host, int(port)
