"""The worker's I/O loop is woken through a pipe by task threads, one byte per loop
turn (Worker._wake / _drain_wake). A wake that lands while the loop drains the pipe
must never be lost: a lost one once left the flag set with the pipe empty, and from
then on every finished task waited for the loop's 250 ms poll timeout."""

from __future__ import annotations

import os
import select
from typing import Any

import pytest

from zdist.worker import worker as worker_module
from zdist.worker.worker import Worker, WorkerConfig

pytestmark = pytest.mark.timeout(60)


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_a_wake_during_the_drain_is_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    w = Worker(WorkerConfig(address="tcp://127.0.0.1:9", security=None))
    try:
        w._wake()  # a task finished: one byte, flag set
        assert _readable(w._wake_r)
        real_read = os.read
        injected: list[int] = []

        def read_while_another_task_finishes(fd: int, n: int) -> Any:
            if fd == w._wake_r and not injected:
                injected.append(fd)
                w._done.append(("seceded", "another-task"))
                w._wake()  # a task thread finishing while the loop drains
            return real_read(fd, n)

        monkeypatch.setattr(worker_module.os, "read", read_while_another_task_finishes)
        w._drain_wake()
        monkeypatch.undo()
        assert injected
        # What was appended before its wake is still there for collect_done() ...
        assert ("seceded", "another-task") in w._done
        # ... and the next task's wake reaches the loop: the flag is not left set
        # with the pipe empty.
        w._wake()
        assert _readable(w._wake_r)
    finally:
        w._shutdown()
