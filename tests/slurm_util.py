"""Helpers for tests that need the CI machine's batch system or its ib0 interface.

Slurm and ib0 are set up as root by ``.ci/run`` (``scripts/ci/start-slurm.sh`` and
``scripts/ci/make-ib0.sh``). On a developer's machine without them the tests skip; under
``CI=true`` they fail instead, so that a broken CI setup cannot pass by skipping.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import struct
import subprocess

import pytest

_SIOCGIFADDR = 0x8915  # <linux/sockios.h>: get an interface's IPv4 address


def _under_ci() -> bool:
    return os.environ.get("CI") == "true"


def _run_ok(argv: list[str]) -> bool:
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=15, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and bool(result.stdout.strip())


def _slurm_reachable() -> bool:
    # `scontrol ping` answers at once when slurmctld is down; sinfo and squeue retry
    # for 9 s first, which would slow down every skipped test on a developer machine.
    return _run_ok(["scontrol", "ping"]) and _run_ok(["sinfo", "-h", "-o", "%T"])


def require_slurm(*, torque: bool = False) -> None:
    """Skip the calling test unless Slurm answers; under ``CI=true`` fail instead.

    ``torque=True`` also requires the Torque-style ``qsub``/``qstat``/``qdel`` wrappers
    (Debian's slurm-wlm-torque, installed by start-slurm.sh).
    """
    if not _slurm_reachable():
        if _under_ci():
            pytest.fail(
                "Slurm is not running under CI=true: "
                ".ci/run must start it with scripts/ci/start-slurm.sh"
            )
        pytest.skip(
            "Slurm is not running; start it as root with "
            "`bash scripts/ci/start-slurm.sh`"
        )
    if torque and shutil.which("qsub") is None:
        message = (
            "qsub (slurm-wlm-torque) is not installed; "
            "scripts/ci/start-slurm.sh installs it"
        )
        if _under_ci():
            pytest.fail(message)
        pytest.skip(message)


def interface_ipv4(name: str) -> str | None:
    """The IPv4 address of network interface ``name``, or None if it has none.

    Linux only; stdlib only. ``interface_ipv4("ib0")`` gives the address of the test
    interface that scripts/ci/make-ib0.sh creates (127.0.2.1 by default).
    """
    request = struct.pack("256s", name.encode()[:15])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
        except OSError:  # no such interface, or no IPv4 address on it
            return None
    return socket.inet_ntoa(reply[20:24])


def require_ib0() -> str:
    """Return ib0's IPv4 address; skip without ib0, or fail under ``CI=true``."""
    address = interface_ipv4("ib0")
    if address is None:
        message = (
            "network interface ib0 is missing; create it as root with "
            "`bash scripts/ci/make-ib0.sh` (.ci/run does)"
        )
        if _under_ci():
            pytest.fail(message)
        pytest.skip(message)
    return address
