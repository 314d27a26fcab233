"""What a running task can ask about where it runs: get_worker, secede, rejoin."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zdist.worker.worker import Worker

_local = threading.local()


def set_current(worker: Worker | None, key: str | None = None) -> None:
    _local.worker = worker
    _local.key = key


def get_worker() -> Worker:
    """The worker running the current task (dask's ``get_worker``)."""
    worker = getattr(_local, "worker", None)
    if worker is None:
        raise ValueError("get_worker() called outside a zdist task: no worker found")
    return worker


def current_key() -> str | None:
    return getattr(_local, "key", None)


def secede() -> None:
    """Leave this task's thread slot, e.g. before waiting on tasks it submitted, so the
    worker can run other tasks meanwhile (dask's ``secede``)."""
    get_worker()._secede(current_key())


def rejoin() -> None:
    """Take a thread slot again after :func:`secede` (dask's ``rejoin``)."""
    get_worker()._rejoin()


def get_client(**kwargs: Any) -> Any:
    """A client on the current worker's broker, for tasks that submit tasks."""
    return get_worker()._get_client(**kwargs)
