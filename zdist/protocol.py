"""The wire contract between clients, the broker and workers.

Every message is ``[VERSION + op + header, *payload]``: one head frame, then the
payload frames.

- ``VERSION`` is the head's first 3 bytes, :data:`VERSION`; a peer speaking another
  version is dropped.
- ``op`` is the 4th byte, an :class:`Op`.
- ``header``, the rest of the head, is msgpack of the message's fields, in
  declaration order; trailing fields at their defaults are left off.
- ``payload`` frames are opaque bytes: pickled functions, arguments, results. The broker
  forwards them without unpickling (the header says which frames belong to what).

Version, op and header share one frame because every frame costs on every hop: a
pyzmq send and receive (~4 us together), and with CurveZMQ its own encrypted box.

Each message is declared once below as a frozen slotted dataclass registered under its
op; :func:`encode` and :func:`decode` are the only codecs. Field types are checked at
decode, so a well-formed but wrongly typed header is rejected as :class:`ProtocolError`
before any state changes.

Frame references in headers are ``[start, count]`` pairs into the payload frames (a
value pickled with protocol 5 is one pickle frame plus its out-of-band buffers), or a
single small frame itself as ``bytes`` (:data:`INLINE_FRAME`).
"""

from __future__ import annotations

import dataclasses
import enum
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import msgpack

if sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:  # only informs type checkers: a no-op where typing lacks it

    def dataclass_transform(**_: Any) -> Callable[[Any], Any]:
        return lambda f: f


VERSION = b"ZD2"
#: Bytes before the msgpack header in a message's head frame: version and op.
HEAD = len(VERSION) + 1

#: Seconds between heartbeats the broker asks of workers; any message counts as one.
HEARTBEAT_INTERVAL = 1.0
#: A worker silent for this many intervals is declared dead (and a worker whose broker
#: is silent that long reconnects). 10-60 is reasonable: lower reacts faster to a dead
#: node; higher tolerates a loaded login node and a broker busy taking in a
#: 1,000,000-task graph (its decoding alone takes seconds). dask waits 5 minutes.
WORKER_LIVENESS = 30
#: Clients heartbeat too, but a busy notebook must not lose its tasks: be generous.
CLIENT_HEARTBEAT_INTERVAL = 2.0
CLIENT_LIVENESS = 60
#: Results at most this large travel inline with their completion notice and are kept
#: by the broker, which saves a fetch round trip for the many tiny results of fine
#: grained graphs. Larger results stay on the worker and move peer to peer.
INLINE_LIMIT = 64 * 1024
#: Frames per message above which a receiver drops it (a 1,000,000-task graph fits).
MAX_FRAMES_DEFAULT = 4_000_000
#: A client sends from a second socket whose identity is its receiving socket's plus
#: this suffix; the broker maps the two to one client.
SENDER_SUFFIX = b"+s"
#: A payload of one frame at most this large travels inside the header (msgpack bin)
#: instead of as a frame of its own: a zmq frame costs ~2 us to send and ~2 us to
#: receive in pyzmq, which dominated the many tiny arguments and results of a map.
INLINE_FRAME = 2048
#: Run numbers (RunTasks.direct, TaskResults.told) of tasks a client sends a worker
#: itself (DirectResults.door) are below this, counted down by the client; the
#: broker numbers its own assignments from 1 up.
DOOR_RUN = 0
#: Bytes per message above which a receiver drops it.
MAX_MESSAGE_BYTES_DEFAULT = 8 * 1024**3


class ProtocolError(ValueError):
    """A message that does not follow this module's contract."""


class Op(enum.IntEnum):
    # worker <-> broker
    REGISTER_WORKER = 1
    WELCOME = 2
    HEARTBEAT = 3
    RUN_TASKS = 4
    TASK_RESULTS = 5
    FREE_KEYS = 6
    SEND_DATA = 7
    DATA_REPLY = 8
    RUN_FUNCTION = 9
    FUNCTION_RESULT = 10
    WORKER_STATUS = 11
    CANCEL_TASKS = 12
    TASK_SECEDED = 13
    # worker <-> worker (data port)
    GET_DATA = 20
    # client <-> broker
    REGISTER_CLIENT = 30
    SUBMIT = 31
    TASK_UPDATES = 32
    RELEASE_KEYS = 33
    GATHER = 34
    CANCEL = 35
    RUN_ON_WORKERS = 36
    RUN_REPLY = 37
    INFO_REQUEST = 38
    INFO_REPLY = 39
    CLIENT_CLOSE = 40
    ERROR = 41
    FIRE_AND_FORGET = 42
    # worker -> client (same host)
    DIRECT_RESULTS = 50
    REPLICATE = 14
    CLOSE_WORKER = 15


_REGISTRY: dict[int, type[Message]] = {}


class Message:
    """Base of all messages; subclasses are frozen slotted dataclasses with an op."""

    __slots__ = ()
    op: ClassVar[Op]
    _types: ClassVar[tuple[type | tuple[type, ...], ...]]
    _fields: ClassVar[tuple[str, ...]]
    _required: ClassVar[int]
    _head: ClassVar[bytes]
    _defaults: ClassVar[tuple[Any, ...]]


_M = TypeVar("_M", bound=Message)


# dataclass_transform lets type checkers see each message's constructor.
@dataclass_transform(frozen_default=True)
def message(op: Op) -> Callable[[type[_M]], type[_M]]:
    """Declare a message class: makes it a frozen slotted dataclass and registers it."""

    def wrap(cls: type[_M]) -> type[_M]:
        cls = dataclasses.dataclass(frozen=True, slots=True)(cls)
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        cls.op = op
        cls._head = VERSION + bytes((op,))
        cls._fields = tuple(f.name for f in fields)
        cls._types = tuple(_runtime_type(f.type) for f in fields)
        # Fields with defaults come last and may be left off by an older sender.
        cls._required = sum(
            f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            for f in fields
        )
        cls._defaults = tuple(f.default for f in fields[cls._required :])
        if op in _REGISTRY:
            raise RuntimeError(f"op {op!r} declared twice")
        _REGISTRY[op] = cls
        return cls

    return wrap


_TYPE_NAMES: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "int": int,
    "float": (float, int),
    "bool": bool,
    "bytes": bytes,
    "list": list,
    "dict": dict,
    "str | None": (str, type(None)),
    "int | None": (int, type(None)),
    "float | None": (float, int, type(None)),
    "dict | None": (dict, type(None)),
    "list | None": (list, type(None)),
}


def _runtime_type(annotation: Any) -> type | tuple[type, ...]:
    name = annotation if isinstance(annotation, str) else annotation.__name__
    base = name.split("[", 1)[0]
    if base not in _TYPE_NAMES:
        raise TypeError(f"unsupported field annotation {name!r}")
    return _TYPE_NAMES[base]


# --------------------------------------------------------------------------------------
# worker <-> broker


@message(Op.REGISTER_WORKER)
class RegisterWorker(Message):
    name: str
    nthreads: int
    memory_limit: int
    resources: dict
    data_address: str
    host: str
    pid: int
    local_directory: str
    versions: dict
    #: Keys this worker holds already: a worker re-registering with a restarted broker.
    keys: list
    #: Connected over the broker's Unix socket, so on the broker's host: it can send
    #: results straight to the clients there (RunTasks.direct).
    local: bool = False


@message(Op.WELCOME)
class Welcome(Message):
    """Broker -> worker or client: registration accepted; the broker owns the timing."""

    heartbeat_interval: float
    liveness: int
    versions: dict
    address: str


@message(Op.HEARTBEAT)
class Heartbeat(Message):
    #: Worker metrics (memory, executing, ready) or empty from clients and the broker.
    metrics: dict


@message(Op.RUN_TASKS)
class RunTasks(Message):
    """Broker -> worker. ``tasks``: ``[key, fn_ref, args_ref, deps, resources]`` where
    ``deps`` is ``[[dep_key, where], ...]`` and ``where`` is ``[start, count]`` (inline
    frames in this message), a peer's data address, or ``""`` (already on this worker).
    ``fn_ref`` is ``None`` for scattered data (``args_ref`` is the value). ``free``:
    keys to drop first, as a :class:`FreeKeys` sent before it would (one message
    instead of two on the path of every round trip). ``direct``: ``[[client_ident,
    address, [[key, run], ...]], ...]``, tasks whose one client reads results on a
    Unix socket of this host (RegisterClient.direct): the worker sends their results
    there itself, as :class:`DirectResults`, and names them with ``run`` (this
    assignment's number) in TaskResults.told. That takes the broker, and a hop, off
    the path of a one-at-a-time round trip."""

    tasks: list
    free: list | None = None
    direct: list | None = None


@message(Op.TASK_RESULTS)
class TaskResults(Message):
    """Worker -> broker, a batch. ``results``: ``[key, status, nbytes, typename, ref,
    text, duration]``; ``status`` is ``"memory"`` (ref: inline result frames or
    ``None``), ``"error"`` (ref: pickled exception + traceback frames, text: ``type:
    message``), ``"cancelled"`` (dropped before it ran, after CancelTasks),
    ``"missing"`` (text: the dependency key that could not be fetched, typename: the
    peer that failed to give it), or ``"refused"`` (a task sent through the worker's
    door that it did not start: see ``door``). ``duration`` is the run time in
    seconds (-1 for a replica fetched from a peer). ``told``: ``[[key, run], ...]``,
    ``"memory"`` results this worker sends to their client itself (RunTasks.direct,
    or a door task); the broker does not, if ``run`` is the task's current
    assignment. The worker reports a result of the broker's before it sends it (so
    the broker knows of a result before its client can ask about it), counting on a
    connection that has worked; ``untold`` then names those whose sending failed
    after all, for the broker to send. A door task's result goes first, and is told
    if it went."""

    results: list
    told: list | None = None
    untold: list | None = None
    #: ``[[key, run], ...]`` of ``results`` whose task a client sent this worker
    #: itself (RunTasks through the worker's door, :attr:`DirectResults.door`;
    #: ``run`` is the client's number for it): their report may reach the broker
    #: before the client's Submit does. Such a task the worker did not start (it
    #: was not idle) is reported ``"refused"``.
    door: list | None = None


@message(Op.FREE_KEYS)
class FreeKeys(Message):
    keys: list


@message(Op.SEND_DATA)
class SendData(Message):
    """Broker -> worker: reply with these keys' values, for request ``request_id``."""

    request_id: int
    keys: list


@message(Op.DATA_REPLY)
class DataReply(Message):
    """Reply to :class:`SendData` or :class:`GetData`: ``values`` is ``[key, ref]``;
    ``missing`` lists keys the sender does not hold. ``shm`` (only to a
    :class:`GetData` that offered a host token) is ``[key, path, [[offset, size],
    ...]]`` per value left in a shared-memory file for the receiver to claim."""

    request_id: int
    values: list
    missing: list
    shm: list | None = None


@message(Op.RUN_FUNCTION)
class RunFunction(Message):
    """Broker -> worker: run the pickled function in frame 0 with args in frame 1."""

    request_id: int


@message(Op.FUNCTION_RESULT)
class FunctionResult(Message):
    """Worker -> broker: ``ok`` and the pickled result (or exception) in the payload."""

    request_id: int
    ok: bool


@message(Op.WORKER_STATUS)
class WorkerStatus(Message):
    """Worker -> broker: ``"paused"``, ``"running"``, ``"closing"`` (a planned exit
    begins: ``returned`` lists the queued task keys it hands back; never counted as a
    failure), ``"retiring"`` (its running tasks are done: move its still-needed results
    elsewhere, then send :class:`CloseWorker`), or ``"closed"`` (gone).
    """

    status: str
    returned: list


@message(Op.CANCEL_TASKS)
class CancelTasks(Message):
    keys: list


@message(Op.TASK_SECEDED)
class TaskSeceded(Message):
    """Worker -> broker: this task left its thread (secede()); its slot is free."""

    key: str


# --------------------------------------------------------------------------------------
# worker <-> worker


@message(Op.GET_DATA)
class GetData(Message):
    """Worker -> worker. ``host``: the requester's shared-memory token
    (zdist.worker.shm.host_token) or "": a server with the same token may reply
    with files instead of bytes."""

    request_id: int
    keys: list
    host: str = ""


# --------------------------------------------------------------------------------------
# client <-> broker


@message(Op.REGISTER_CLIENT)
class RegisterClient(Message):
    """``direct``: a Unix socket (``ipc://``) this client also reads on, in a private
    directory of this host, where workers on the broker's host may send it results
    (RunTasks.direct); ``None`` for a client that reaches the broker over TCP."""

    name: str
    versions: dict
    direct: str | None = None


@message(Op.SUBMIT)
class Submit(Message):
    """Client -> broker. ``tasks``: ``[key, fn_ref, args_ref, deps, priority, retries,
    resources, workers, allow_other_workers]``, dependencies before dependents where
    possible. ``wants``: keys the client holds futures for (new or already known).
    ``release``: keys released first, as a :class:`ReleaseKeys` sent before it would
    (a sequence of ``submit(...).result()`` then sends one message per round trip)."""

    tasks: list
    wants: list
    release: list | None = None
    #: ``[[key, worker, run], ...]``: tasks of ``tasks`` this client also sent
    #: straight to an idle worker on this host (its identity, as
    #: :attr:`DirectResults.worker` gave it), numbered ``run`` (< DOOR_RUN, this
    #: client's own count), which runs them at once: the broker records them as
    #: processing there.
    via: list | None = None


def submit_entry(
    key: str,
    fn_ref: Any,
    args_ref: Any,
    deps: list[str],
    priority: float = 0,
    retries: int = 0,
    resources: dict[str, float] | None = None,
    workers: list[str] | None = None,
    allow_other_workers: bool = False,
) -> list[Any]:
    """One task of :attr:`Submit.tasks`, in the order its docstring gives."""
    return [
        key,
        fn_ref,
        args_ref,
        deps,
        priority,
        retries,
        resources,
        workers,
        allow_other_workers,
    ]


@message(Op.TASK_UPDATES)
class TaskUpdates(Message):
    """Broker -> client, a batch. ``updates``: ``[key, status, ref, text]``; status is
    ``finished`` (ref: inline result or ``None``), ``error`` (ref: exception frames,
    text: its description), ``cancelled`` or ``lost`` (text says why)."""

    updates: list


@message(Op.DIRECT_RESULTS)
class DirectResults(Message):
    """Worker -> client on the same host (RunTasks.direct): ``updates`` as in
    :class:`TaskUpdates`, all ``finished``. It may arrive before or after the broker's
    word on the same key; it never overrides a future already settled. ``door``: a
    Unix socket of this worker's (``ipc://PATH``, in its user's private directory;
    a plain ``SOCK_SEQPACKET`` socket, not ZeroMQ: zdist.datagram) where the client
    may send a lone task (a :class:`RunTasks` naming the client in ``direct`` with a
    run below DOOR_RUN) while the worker is idle, telling the broker with
    :attr:`Submit.via` and ``worker``, the worker's identity with the broker. That
    takes the broker off the path of a one-at-a-time round trip. The result of such
    a task comes back on the same connection, as a DirectResults, when it can."""

    updates: list
    door: str | None = None
    worker: str | None = None


@message(Op.RELEASE_KEYS)
class ReleaseKeys(Message):
    keys: list


@message(Op.GATHER)
class Gather(Message):
    request_id: int
    keys: list


@message(Op.CANCEL)
class Cancel(Message):
    keys: list
    force: bool


@message(Op.RUN_ON_WORKERS)
class RunOnWorkers(Message):
    """Client -> broker: function + args frames to run on ``workers`` (all if empty)."""

    request_id: int
    workers: list


@message(Op.RUN_REPLY)
class RunReply(Message):
    """Broker -> client: ``results`` is ``[worker_address, ok, ref]``."""

    request_id: int
    results: list


@message(Op.INFO_REQUEST)
class InfoRequest(Message):
    request_id: int
    what: str


@message(Op.INFO_REPLY)
class InfoReply(Message):
    request_id: int
    info: dict


@message(Op.CLIENT_CLOSE)
class ClientClose(Message):
    pass


@message(Op.REPLICATE)
class Replicate(Message):
    """Broker -> worker: fetch and keep these results from peers (``[key, address]``),
    so a retiring worker's still-needed results survive its exit."""

    keys: list


@message(Op.CLOSE_WORKER)
class CloseWorker(Message):
    """Broker -> retiring worker: every result it alone held is safe; exit now."""


@message(Op.FIRE_AND_FORGET)
class FireAndForget(Message):
    """Client -> broker: run these keys to completion even after the client leaves."""

    keys: list


@message(Op.ERROR)
class Error(Message):
    """Broker -> client: request ``request_id`` (0: none) failed with ``text``."""

    request_id: int
    text: str


# --------------------------------------------------------------------------------------
# codecs

# A Packer keeps an internal buffer and is not thread-safe (msgpack's docs), while
# encode() is called from several threads of one process (a client's I/O thread, a
# worker's loop, an in-process broker): one Packer per thread.
_local = threading.local()


def _packb(obj: Any) -> bytes:
    try:
        pack = _local.pack
    except AttributeError:
        pack = _local.pack = msgpack.Packer(use_bin_type=True).pack
    return pack(obj)  # type: ignore[no-any-return]


def encode(msg: Message, payload: Sequence[Any] = ()) -> list[Any]:
    """Frames for ``msg``: the head (version, op, header), then ``payload``
    unchanged."""
    values = [getattr(msg, name) for name in msg._fields]
    required = msg._required
    if len(values) > required:
        # Trailing fields at their defaults are left off: a peer from before they
        # were declared reads the message as it always did.
        defaults = msg._defaults
        while (
            len(values) > required
            and values[-1] == defaults[len(values) - required - 1]
        ):
            values.pop()
    return [msg._head + _packb(values), *payload]


def decode(frames: Sequence[Any]) -> tuple[Message, list[Any]]:
    """Parse received frames (bytes or zmq.Frame) into a message and its payload.

    Raises :class:`ProtocolError` for anything that is not a well-formed message of
    this version; the caller logs and drops it.
    """
    if not frames:
        raise ProtocolError("no frames")
    head = _bytes(frames[0])
    if head[: HEAD - 1] != VERSION:
        raise ProtocolError(f"protocol version {head[: HEAD - 1]!r} != {VERSION!r}")
    cls = _REGISTRY.get(head[HEAD - 1]) if len(head) >= HEAD else None
    if cls is None:
        raise ProtocolError(f"unknown op {head[HEAD - 1 : HEAD]!r}")
    try:
        fields = msgpack.unpackb(
            memoryview(head)[HEAD:], raw=False, strict_map_key=False
        )
    except Exception as exc:
        raise ProtocolError(f"undecodable {cls.__name__} header: {exc}") from None
    if not isinstance(fields, list) or not (
        cls._required <= len(fields) <= len(cls._fields)
    ):
        raise ProtocolError(f"{cls.__name__} header has the wrong shape")
    # strict=False: trailing fields with defaults may be missing (shape checked above).
    for name, value, typ in zip(cls._fields, fields, cls._types, strict=False):
        # bool is an int subclass: True is no count, interval or request id.
        if not isinstance(value, typ) or (
            isinstance(value, bool) and typ is not bool and bool not in _as_tuple(typ)
        ):
            raise ProtocolError(
                f"{cls.__name__}.{name} is {type(value).__name__}, not {typ}"
            )
    return cls(*fields), list(frames[1:])


def _as_tuple(typ: type | tuple[type, ...]) -> tuple[type, ...]:
    return typ if isinstance(typ, tuple) else (typ,)


def _bytes(frame: Any) -> bytes:
    if isinstance(frame, bytes):
        return frame
    if isinstance(frame, (bytearray, memoryview)):
        return bytes(frame)
    try:
        return frame.bytes  # type: ignore[no-any-return]  # zmq.Frame
    except AttributeError:
        raise ProtocolError(f"a frame is {type(frame).__name__}, not bytes") from None


def key_runs(entries: Any, what: str) -> dict[str, int]:
    """``[[key, run], ...]`` (RunTasks.direct, TaskResults.told) as a dict, checked:
    raises ProtocolError naming ``what`` for anything else."""
    if type(entries) is not list:
        raise ProtocolError(f"malformed {what}: {entries!r:.200}")
    runs = {}
    for entry in entries:
        if (
            type(entry) is not list
            or len(entry) != 2
            or type(entry[0]) is not str
            or type(entry[1]) is not int
        ):
            raise ProtocolError(f"malformed {what} entry {entry!r:.200}")
        runs[entry[0]] = entry[1]
    return runs


def ref_frames(payload: Sequence[Any], ref: Any) -> list[Any]:
    """The payload frames that a reference names, checked: ``[start, count]`` into
    the payload, or the one frame itself as ``bytes`` (see :data:`INLINE_FRAME`)."""
    if type(ref) is bytes:
        return [ref]
    if (
        type(ref) is not list
        or len(ref) != 2
        or type(ref[0]) is not int
        or type(ref[1]) is not int
        or ref[0] < 0
        or ref[1] < 1
        or ref[0] + ref[1] > len(payload)
    ):
        raise ProtocolError(f"bad frame reference {ref!r}")
    return list(payload[ref[0] : ref[0] + ref[1]])


class FrameList:
    """Builds a payload while handing out references into it: ``[start, count]``, or
    a single small frame itself (``bytes``, carried in the header)."""

    __slots__ = ("_index", "frames")

    def __init__(self) -> None:
        self.frames: list[Any] = []
        # id -> (the object, its ref): holding the object keeps its id from being
        # reused by a later, different list while this FrameList lives.
        self._index: dict[int, tuple[Sequence[Any], list[int]]] = {}

    def add(
        self, frames: Sequence[Any], share: bool = False, inline: bool = True
    ) -> list[int] | bytes:
        """Append ``frames``; with ``share``, the same frames object is added once.

        A single frame of at most :data:`INLINE_FRAME` bytes is returned as the
        reference itself unless ``inline`` is false (function frames: a map's tasks
        share one, which must stay one frame).
        """
        if inline and len(frames) == 1:
            f = frames[0]
            t = type(f)
            if t is bytes:
                if len(f) <= INLINE_FRAME:
                    return f  # type: ignore[no-any-return]
            elif (f.nbytes if t is memoryview else len(f)) <= INLINE_FRAME:
                return _bytes(f)
        if share:
            seen = self._index.get(id(frames))
            if seen is not None and seen[0] is frames:
                return list(seen[1])
        ref = [len(self.frames), len(frames)]
        self.frames.extend(frames)
        if share:
            self._index[id(frames)] = (frames, ref)
        return list(ref)


def message_types() -> dict[int, type[Message]]:
    """Every declared message class by op (the round-trip test walks this)."""
    return dict(_REGISTRY)
