"""Exceptions raised by zdist.

::

    ZdistError
    ├── CommClosedError          the connection to the broker is gone
    ├── SecurityError            missing or wrong credentials (also a ValueError)
    ├── GraphError               a submitted graph has a cycle or a dangling key
    ├── RemoteError              a task's exception could not be rebuilt in the client
    ├── KilledWorker             a task was running on too many workers that died
    ├── FutureCancelledError     (CancelledError) the future was cancelled
    └── FutureLostError          the broker lost the task (restart, client timeout)

``TimeoutError`` (the builtin) is raised by ``result(timeout=)``, ``wait`` and
``wait_for_workers``, as in dask.distributed.
"""

from __future__ import annotations

from concurrent.futures import CancelledError


class ZdistError(Exception):
    """Base class of zdist's own exceptions."""


class CommClosedError(ZdistError, ConnectionError):
    """The broker is unreachable or the client was closed."""


class SecurityError(ZdistError, ValueError):
    """Credentials are missing, unreadable or do not match the cluster."""


class GraphError(ZdistError, ValueError):
    """A graph was rejected as a whole: a cycle, or a key nothing defines."""


class RemoteError(ZdistError):
    """A task failed with an exception that cannot be rebuilt here (its class does not
    unpickle in the client); the message holds its type, text and remote traceback."""


class KilledWorker(ZdistError):
    """A task was running on ``allowed_failures`` + 1 workers that all died."""

    def __init__(self, task: str, last_worker: str, workers: list[str] | None = None):
        self.task = task
        self.last_worker = last_worker
        self.workers = list(workers or [last_worker])
        super().__init__(
            f"Attempted to run task {task!r} on {len(self.workers)} different workers, "
            f"but all those workers died while running it. The last worker that "
            f"attempted to run the task was {last_worker}."
        )

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (KilledWorker, (self.task, self.last_worker, self.workers))


class FutureCancelledError(ZdistError, CancelledError):
    """The future was cancelled (``Future.cancel`` or ``Client.cancel``)."""


class FutureLostError(ZdistError):
    """The broker no longer knows this task (it restarted, or it released it)."""


class RemoteTraceback(Exception):
    """Carries a worker-side traceback as the ``__cause__`` of a task's exception, the
    way concurrent.futures.ProcessPoolExecutor shows remote tracebacks."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
