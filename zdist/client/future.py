"""Future: a handle on a task's result, with dask.distributed's API.

Several Future objects may name one key; they share a :class:`FutureState`, and the
client counts them. When the last one is garbage collected the client tells the broker,
which frees the result unless another task or client still needs it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from zdist import serialize
from zdist.errors import (
    CommClosedError,
    FutureCancelledError,
    FutureLostError,
    RemoteError,
    RemoteTraceback,
)

if TYPE_CHECKING:
    from zdist.client.client import Client

logger = logging.getLogger(__name__)

_NO_VALUE = object()


class FutureState:
    """Shared by every Future of one key; set by the client's I/O thread."""

    __slots__ = (
        "_event",
        "_value",
        "_wakers",
        "callbacks",
        "done",
        "frames",
        "lock",
        "status",
        "text",
    )

    def __init__(self) -> None:
        self.status = "pending"
        self.done = False
        # Made only when someone blocks: map() creates thousands of states, and most
        # are read after they finish.
        self._event: threading.Event | None = None
        self.frames: list[Any] | None = None  # inline result or exception frames
        self.text = ""
        self._value: Any = _NO_VALUE
        self.callbacks: list[Callable[[], None]] = []
        self.lock = threading.Lock()
        # Threads reading the socket themselves while they wait (Connection.wait_for)
        self._wakers: list[Any] | None = None

    def finish(
        self,
        status: str,
        frames: list[Any] | None,
        text: str,
        defer: Callable[[list[Callable[[], None]]], None] | None = None,
        only_pending: bool = False,
    ) -> None:
        """Settle the state. Callbacks are handed to ``defer`` (the connection's I/O
        thread queue) while the connection runs; without it (after close) they run
        here. ``only_pending``: leave a state already settled alone (a result sent
        by a worker, that the broker's word may have overtaken)."""
        with self.lock:
            if self.done and (only_pending or status == self.status):
                return
            self.status = status
            self.frames = frames
            self.text = text
            self._value = _NO_VALUE
            self.done = True
            if self._event is not None:
                self._event.set()
            wakers = self._wakers
            callbacks, self.callbacks = self.callbacks, []
        if wakers:
            for waker in list(wakers):
                waker.wake()
        if not callbacks:
            return
        if defer is not None:
            defer(callbacks)
            return
        for cb in callbacks:
            try:
                cb()
            except Exception:
                logger.exception("future callback failed")

    def add_waker(self, waker: Any) -> bool:
        """Wake ``waker`` when finished; False if finished already."""
        with self.lock:
            if self.done:
                return False
            if self._wakers is None:
                self._wakers = []
            self._wakers.append(waker)
            return True

    def remove_waker(self, waker: Any) -> None:
        with self.lock:
            if self._wakers is not None and waker in self._wakers:
                self._wakers.remove(waker)

    def reset(self) -> None:
        with self.lock:
            self.status = "pending"
            self.frames = None
            self._value = _NO_VALUE
            self.done = False
            if self._event is not None:
                self._event.clear()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished (or ``timeout`` seconds); True if finished."""
        if self.done:
            return True
        with self.lock:
            if self.done:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def has_value(self) -> bool:
        return self._value is not _NO_VALUE

    def value(self) -> Any:
        if self._value is _NO_VALUE:
            assert self.frames is not None
            self._value = serialize.loads(self.frames)
        return self._value

    def set_value(self, value: Any) -> None:
        self._value = value

    def exception(self) -> BaseException:
        if self.status == "cancelled":
            return FutureCancelledError(self.text or "cancelled")
        if self.status == "lost":
            return FutureLostError(self.text)
        if self.status == "closed":
            return CommClosedError(self.text)
        if self._value is _NO_VALUE:
            self._value = rebuild_exception(self.frames, self.text)
        return self._value


def rebuild_exception(frames: list[Any] | None, text: str) -> BaseException:
    """The task's exception with the worker-side traceback as its ``__cause__``."""
    if not frames:
        return RemoteError(text)
    try:
        payload = serialize.loads(frames)
    except Exception as exc:
        return RemoteError(
            f"{text}\n(its exception could not be unpickled here: {exc})"
        )
    if isinstance(payload, BaseException):  # raised by the broker (KilledWorker, ...)
        return payload
    error, tb = payload
    if error is None:
        summary = text.split("\n", 1)[0]
        return RemoteError(f"{summary}\n\nRemote traceback:\n{tb}")
    error.__cause__ = RemoteTraceback(tb)
    return error


class Future:
    """The result of a task that may not have run yet (dask.distributed's Future)."""

    __slots__ = ("__weakref__", "_state", "client", "key")

    def __init__(
        self, key: str, client: Client, state: FutureState | None = None
    ) -> None:
        self.key = key
        self.client = client
        self._state = state if state is not None else client._state_for(key)
        client._inc_ref(key)

    @property
    def __zdist_key__(self) -> str:
        return self.key

    @property
    def status(self) -> str:
        """``pending``, ``finished``, ``error``, ``cancelled`` or ``lost``."""
        return self._state.status

    def done(self) -> bool:
        return self._state.done

    def cancelled(self) -> bool:
        return self._state.status == "cancelled"

    def _wait(self, timeout: float | None = None) -> bool:
        """Block until done (or ``timeout`` seconds); True if done."""
        st = self._state
        return st.done or self.client._conn.wait_for(st, timeout)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the task and return its value, or raise its exception."""
        st = self._state
        if not self._wait(timeout):
            raise TimeoutError(f"result of {self.key!r} not ready within {timeout} s")
        if st.status == "finished":
            if st.frames is None and not st.has_value():
                return self.client._fetch_values([self], timeout)[0]
            return st.value()
        raise st.exception()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        st = self._state
        if not self._wait(timeout):
            raise TimeoutError(f"{self.key!r} not done within {timeout} s")
        return None if st.status == "finished" else st.exception()

    def traceback(self, timeout: float | None = None) -> Any:
        exc = self.exception(timeout)
        return None if exc is None else exc.__traceback__

    def cancel(self, force: bool = False) -> None:
        self.client.cancel([self], force=force)

    def add_done_callback(self, fn: Callable[[Future], Any]) -> None:
        """Call ``fn(future)`` when done (from the client's I/O thread)."""
        st = self._state

        def cb() -> None:
            fn(self)

        with st.lock:
            if not st.done:
                st.callbacks.append(cb)
                return
        cb()

    def release(self) -> None:
        self.client._dec_ref(self.key)

    def __del__(self) -> None:
        try:
            self.client._dec_ref(self.key)
        except Exception:  # interpreter shutdown
            pass

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError(
            "a zdist Future cannot be pickled on its own; pass it as an argument to "
            "submit/map (it becomes a dependency) or call .result()"
        )

    def __repr__(self) -> str:
        st = self._state
        return f"<Future: {st.status}, key: {self.key}>"

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Future) and other.key == self.key
