"""Helpers for tests: wait on conditions, never on sleeps."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.01,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def zproc(argv: list[str], **kwargs: Any) -> Any:
    """Start ``python -m argv[0] --lifeline argv[1:]`` with stdin as its lifeline, so
    it exits even if this test process is killed before its teardown runs."""
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", argv[0], "--lifeline", *argv[1:]],
        stdin=subprocess.PIPE,
        **kwargs,
    )


def parent_of(pid: int) -> int:
    """The parent process id of ``pid``, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def descendants(pid: int) -> list[int]:
    """Every live descendant of process ``pid`` (children, theirs, ...), from /proc."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = parent_of(int(entry))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        kids.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for k in kids.get(stack.pop(), []):
            found.append(k)
            stack.append(k)
    return found
