"""The broker's records: task states and their legal moves, tasks, workers, clients,
configuration, and the checks applied to what arrives from the network. Data only:
the behaviour lives in :mod:`zdist.broker.state` and :mod:`zdist.broker.clients`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from zdist import protocol as P

Out = tuple[bytes, P.Message, list[Any]]


class TaskState(enum.Enum):
    RELEASED = "released"
    """In the graph but not computed and not scheduled (or its result was freed)."""
    WAITING = "waiting"
    """Some dependency is not in memory yet."""
    READY = "ready"
    """Every dependency is in memory; waiting for a worker slot."""
    PROCESSING = "processing"
    """Sent to a worker (queued or running there)."""
    MEMORY = "memory"
    """Finished; the result is on one or more workers (and inline here if small)."""
    ERRED = "erred"
    """Failed (its own exception, or a dependency's); final until forgotten."""


FINAL_STATES = frozenset({TaskState.MEMORY, TaskState.ERRED})
#: States in which a task still needs its dependencies' results.
_ACTIVE = frozenset({TaskState.WAITING, TaskState.READY, TaskState.PROCESSING})

_TRANSITIONS: frozenset[tuple[TaskState, TaskState]] = frozenset(
    {
        (TaskState.RELEASED, TaskState.WAITING),
        (TaskState.RELEASED, TaskState.READY),
        (TaskState.RELEASED, TaskState.ERRED),
        (TaskState.WAITING, TaskState.READY),
        (TaskState.WAITING, TaskState.RELEASED),
        (TaskState.WAITING, TaskState.ERRED),
        (TaskState.READY, TaskState.PROCESSING),
        (TaskState.READY, TaskState.WAITING),
        (TaskState.READY, TaskState.RELEASED),
        (TaskState.READY, TaskState.ERRED),
        (TaskState.PROCESSING, TaskState.MEMORY),
        (TaskState.PROCESSING, TaskState.ERRED),
        (TaskState.PROCESSING, TaskState.READY),
        (TaskState.PROCESSING, TaskState.WAITING),
        (TaskState.PROCESSING, TaskState.RELEASED),
        (TaskState.MEMORY, TaskState.RELEASED),
        (TaskState.MEMORY, TaskState.WAITING),
        (TaskState.MEMORY, TaskState.READY),
        (TaskState.ERRED, TaskState.RELEASED),
    }
)
# The hot path reads these as member attributes: an Enum hashes through a Python-level
# __hash__, and a (state, state) set lookup cost more than the rest of a transition.
for _state in TaskState:
    _state.allowed = tuple(b for a, b in _TRANSITIONS if a is _state)  # type: ignore[attr-defined]
    _state.active = _state in _ACTIVE  # type: ignore[attr-defined]
del _state

#: The pseudo-client that wants fire_and_forget tasks until they finish.
FIRE_AND_FORGET = b""
#: Transitions kept per task in story() for debugging (dask's ``story``).
STORY_LENGTH = 8
#: Transitions kept in all (one log for the broker, like dask's transition_log).
TRANSITION_LOG_LENGTH = 100_000
#: A dependency at least this large pins its dependent to the worker holding it.
LOCALITY_BYTES = 1_000_000
#: Keep each worker supplied with enough queued tasks to cover this much work, so it
#: never idles for a round trip; bounded by MAX_EXTRA_PER_THREAD for very short tasks.
PIPELINE_SECONDS = 0.005
MAX_EXTRA_PER_THREAD = 64


class IllegalTransition(RuntimeError):
    pass


class Task:
    __slots__ = (
        "args",
        "deps",
        "direct_run",
        "direct_to",
        "error",
        "failed_on",
        "fn",
        "group",
        "inline",
        "key",
        "n_active",
        "nbytes",
        "priority",
        "processing_on",
        "queued",
        "resources",
        "restrict",
        "retries",
        "state",
        "suspicious",
        "typename",
        "waiting_on",
        "wanted_by",
        "who_has",
    )

    def __init__(
        self,
        key: str,
        fn: list[Any] | None,
        args: list[Any],
        deps: tuple[str, ...],
        priority: tuple[int, ...],
        retries: int = 0,
        resources: dict[str, float] | None = None,
        restrict: tuple[set[str], bool] | None = None,
    ) -> None:
        self.key = key
        self.fn = fn
        self.args = args
        self.deps = deps
        self.priority = priority
        self.retries = retries
        self.resources = resources or None
        self.restrict = restrict
        self.state = TaskState.RELEASED
        self.waiting_on = 0
        # Dependents in an _ACTIVE state (kept by _transition): is my result needed?
        self.n_active = 0
        self.who_has: set[bytes] = set()
        self.inline: list[Any] | None = None
        self.nbytes = 0
        self.typename = ""
        self.processing_on: bytes | None = None
        #: The client its worker was asked to send the result to (RunTasks.direct),
        #: and that assignment's number (a late report of an earlier run says another).
        self.direct_to: bytes | None = None
        #: Below P.DOOR_RUN: a client sent it through the door of processing_on.
        self.direct_run = 0
        self.wanted_by: set[bytes] = set()
        self.suspicious = 0
        self.group = ""  # dask's key_split of the key, for progress and the dashboard
        self.failed_on: list[str] = []
        self.error: tuple[list[Any], str] | None = None
        self.queued = 0  # generation of its live entry in a ready queue (0: none)


class Worker:
    __slots__ = (
        "address",
        "avail",
        "avg_duration",
        "data",
        "handoff",
        "host",
        "ident",
        "last_seen",
        "last_sent",
        "local",
        "local_directory",
        "local_queue",
        "memory_limit",
        "metrics",
        "name",
        "nthreads",
        "order",
        "pid",
        "processing",
        "resources",
        "seceded",
        "status",
        "stealing",
        "versions",
        "zombies",
    )

    def __init__(self, ident: bytes, msg: P.RegisterWorker, now: float) -> None:
        self.ident = ident
        self.name = msg.name
        self.address = msg.data_address
        self.host = msg.host
        self.nthreads = max(1, msg.nthreads)
        #: Registration order: among equally loaded workers, the first gets work.
        self.order = 0
        self.memory_limit = msg.memory_limit
        self.resources: dict[str, float] = dict(msg.resources)
        self.avail: dict[str, float] = dict(msg.resources)
        self.pid = msg.pid
        self.local_directory = msg.local_directory
        #: On the broker's host (over its Unix socket): may send clients results.
        self.local = msg.local
        self.versions = msg.versions
        self.processing: dict[str, None] = {}
        self.seceded: set[str] = set()
        # Cancelled while running: the thread stays busy until the worker reports back.
        self.zombies: set[str] = set()
        # Queued here, asked back (CancelTasks) for an idle worker; see _steal().
        self.stealing: set[str] = set()
        # Results a retiring worker waits to see copied elsewhere before it exits.
        self.handoff: set[str] = set()
        self.data: set[str] = set()
        self.local_queue: list[tuple[Any, ...]] = []
        self.last_seen = now
        self.last_sent = now
        self.metrics: dict[str, Any] = {}
        self.status = "running"
        self.avg_duration = 0.0

    def capacity(self) -> int:
        if self.avg_duration > 0:
            extra = int(PIPELINE_SECONDS / self.avg_duration)
            extra = max(1, min(extra, MAX_EXTRA_PER_THREAD))
        else:
            extra = 2
        return self.nthreads * (1 + extra)

    def free_slots(self) -> int:
        if self.status != "running":
            return 0
        return self.capacity() - self.occupancy()

    def occupancy(self) -> int:
        return len(self.processing) - len(self.seceded) + len(self.zombies)


class ClientRec:
    __slots__ = ("direct", "ident", "last_seen", "name", "versions", "wants")

    def __init__(
        self,
        ident: bytes,
        name: str,
        versions: dict[str, Any],
        now: float,
        direct: str | None = None,
    ):
        self.ident = ident
        self.name = name
        self.versions = versions
        #: Where this client reads results sent by workers on this host (or None).
        self.direct = direct
        self.wants: set[str] = set()
        self.last_seen = now


@dataclass(frozen=True)
class BrokerConfig:
    address: str = ""
    heartbeat_interval: float = P.HEARTBEAT_INTERVAL
    liveness: int = P.WORKER_LIVENESS
    client_heartbeat_interval: float = P.CLIENT_HEARTBEAT_INTERVAL
    client_liveness: int = P.CLIENT_LIVENESS
    #: dask's ``distributed.scheduler.allowed-failures``.
    allowed_failures: int = 3


class _Pending:
    """A gather or run request waiting for replies."""

    __slots__ = ("client", "client_request", "remaining", "results", "worker")

    def __init__(
        self,
        client: bytes,
        client_request: int,
        remaining: set[Any],
        worker: bytes = b"",
    ):
        self.client = client
        self.client_request = client_request
        self.remaining = remaining
        self.results: list[Any] = []
        #: For a gather: the one worker asked (only its reply is accepted).
        self.worker = worker


#: Statuses a worker may report in WorkerStatus.
_WORKER_STATUSES = frozenset({"running", "paused", "closing", "retiring", "closed"})


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_resources(resources: Any) -> None:
    """Resources are ``{name: amount}``; anything else would break dispatch later."""
    if not isinstance(resources, dict) or not all(
        isinstance(k, str) and _is_number(v) and v >= 0 for k, v in resources.items()
    ):
        raise P.ProtocolError(f"malformed resources {resources!r}")


def _check_result(entry: Any, payload: list[Any]) -> list[Any] | None:
    """Validate one TaskResults entry; return the frames its ref names (or None)."""
    if not isinstance(entry, list) or len(entry) != 7:
        raise P.ProtocolError("malformed task result entry")
    key, status, nbytes, typename, ref, text, duration = entry
    if (
        not isinstance(key, str)
        or not isinstance(typename, str)
        or not isinstance(text, str)
        or type(nbytes) is not int
        or not _is_number(duration)
    ):
        raise P.ProtocolError(f"malformed task result entry for {key!r}")
    if status == "memory":
        return None if ref is None else P.ref_frames(payload, ref)
    if status == "error":
        return P.ref_frames(payload, ref)
    if status in ("missing", "cancelled", "refused"):
        return None
    raise P.ProtocolError(f"unknown task status {status!r}")


def _dependency_order(new: dict[str, tuple[Any, ...]]) -> list[str]:
    indegree = {k: 0 for k in new}
    dependents: dict[str, list[str]] = {}
    for k, v in new.items():
        for d in v[2]:
            if d in new:
                indegree[k] += 1
                dependents.setdefault(d, []).append(k)
    order = [k for k, n in indegree.items() if n == 0]
    for k in order:  # grows while iterating
        for dk in dependents.get(k, ()):
            indegree[dk] -= 1
            if indegree[dk] == 0:
                order.append(dk)
    return order
