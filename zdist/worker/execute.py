"""Running one task: frames in, result entry out. No sockets; called from task threads.

A task is a pickled function frame (cached by content: ``map`` sends one function for
thousands of tasks) and an arguments frame whose references to other tasks' results
are resolved through ``lookup`` as it unpickles.
"""

from __future__ import annotations

import pickle
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import cloudpickle

from zdist import serialize
from zdist.keys import key_group
from zdist.protocol import INLINE_LIMIT

#: Deserialised functions kept per worker, by their pickled bytes.
FUNCTION_CACHE_SIZE = 512


#: A function whose last QUICK_AFTER_RUNS runs each took less than this may
#: run on the worker's I/O thread, saving two thread hand-offs (about 150 us) per task;
#: heartbeats wait at most this long.
QUICK_TASK_SECONDS = 0.002
QUICK_AFTER_RUNS = 3
#: A function that once ran this long never runs on the I/O thread: a thread
#: preempted on a busy machine loses milliseconds, not this.
SLOW_TASK_SECONDS = 0.1


class FunctionCache:
    def __init__(self, size: int = FUNCTION_CACHE_SIZE) -> None:
        self._cache: OrderedDict[bytes, Callable[..., Any]] = OrderedDict()
        self._size = size
        # Quick runs in a row by task group (the key's prefix: the user's function
        # name, or the dask operation), not by pickled function: graph tasks all
        # share one wrapper whose cost is that of what it wraps. One slow run (a
        # thread preempted on a busy machine, the first call's imports) counts until
        # QUICK_AFTER_RUNS quick ones follow it, not for ever. A group with a run
        # of SLOW_TASK_SECONDS or more never runs there (-1): such a run would hold
        # up the worker's heartbeats, transfers and cancels.
        self._quick_runs: dict[str, int] = {}

    def record(self, group: str, duration: float) -> None:
        streak = self._quick_runs
        n = streak.get(group)
        if n is None:
            if len(streak) > self._size:
                streak.clear()
            n = 0
        if n < 0:
            return
        if duration >= SLOW_TASK_SECONDS:
            streak[group] = -1
        else:
            streak[group] = n + 1 if duration < QUICK_TASK_SECONDS else 0

    def is_quick(self, group: str) -> bool:
        """The last QUICK_AFTER_RUNS runs each took under QUICK_TASK_SECONDS, and
        none ever took SLOW_TASK_SECONDS."""
        return self._quick_runs.get(group, 0) >= QUICK_AFTER_RUNS

    def get(self, frame: Any) -> Callable[..., Any]:
        data = frame if isinstance(frame, bytes) else bytes(frame)
        fn = self._cache.get(data)
        if fn is None:
            fn = cloudpickle.loads(data)
            self._cache[data] = fn
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return fn


class Outcome:
    """What a task thread hands back to the worker's I/O loop."""

    __slots__ = (
        "duration",
        "error_frames",
        "key",
        "nbytes",
        "ok",
        "text",
        "typename",
        "value",
        "value_frames",
    )

    def __init__(self, key: str) -> None:
        self.key = key
        self.ok = False
        self.value: Any = None
        self.value_frames: list[Any] | None = None  # inline result, when small
        self.nbytes = 0
        self.typename = ""
        self.error_frames: list[Any] | None = None
        self.text = ""
        self.duration = 0.0


def run_task(
    key: str,
    fn_frames: list[Any] | None,
    args_frames: list[Any],
    lookup: Callable[[str], Any] | None,
    functions: FunctionCache,
) -> Outcome:
    """Run one task; ``lookup`` resolves dependencies (None: the task has none)."""
    out = Outcome(key)
    start = time.perf_counter()
    try:
        if fn_frames is None:  # scattered data: the "arguments" are the value
            value = serialize.loads(args_frames)
        else:
            fn = functions.get(fn_frames[0])
            if lookup is None:
                args, kwargs = serialize.loads(args_frames)
            else:
                args, kwargs = serialize.loads_args(args_frames, lookup)
            value = fn(*args, **kwargs)
            functions.record(key_group(key), time.perf_counter() - start)
    except BaseException as exc:
        out.duration = time.perf_counter() - start
        if fn_frames is not None:
            functions.record(key_group(key), out.duration)
        _set_error(out, exc)
        return out
    out.duration = time.perf_counter() - start
    try:
        frames = serialize.dumps(value)
    except Exception as exc:
        _set_error(
            out,
            TypeError(
                f"the result of {key!r} (a {type(value).__name__}) cannot be "
                f"pickled: {exc}"
            ),
        )
        return out
    out.ok = True
    out.value = value
    out.nbytes = serialize.nbytes(frames)
    out.typename = type(value).__name__
    if out.nbytes <= INLINE_LIMIT:
        out.value_frames = [
            bytes(f) if isinstance(f, memoryview) else f for f in frames
        ]
    return out


def _set_error(out: Outcome, exc: BaseException) -> None:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    # The text travels unpickled, for the dashboard's error list and for clients that
    # cannot rebuild the exception: the description, then the traceback's tail.
    out.text = f"{type(exc).__name__}: {exc}\n\n{tb[-4000:]}"
    try:
        frames = serialize.dumps((exc, tb))
        pickle.loads(frames[0], buffers=frames[1:])  # can the client rebuild it?
    except Exception:
        frames = serialize.dumps((None, tb))
    out.error_frames = frames
