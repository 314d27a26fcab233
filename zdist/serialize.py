"""Values to frames and back: pickle protocol 5 with out-of-band buffers.

A value becomes ``[pickle, *buffers]``: large ``bytes``-like objects and numpy arrays
travel as their own frames without being copied into the pickle. Plain :mod:`pickle` is
tried first because it is several times faster than cloudpickle on ordinary data;
cloudpickle handles what pickle cannot (lambdas, closures, interactively defined
classes).

Task arguments may refer to other tasks' results. The client pickles them with
:func:`dumps_args`, which turns every :class:`KeyRef` (and every Future, which presents
itself as one through ``__zdist_key__``) into a pickle *persistent id*; the worker
resolves them with :func:`loads_args` from a lookup function. This finds references at
any depth, even inside user objects, with no separate traversal.
"""

from __future__ import annotations

import io
import pickle
import types
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle

PROTOCOL = 5
#: Buffers smaller than this are left inside the pickle: a frame per tiny buffer costs
#: more than copying it.
MIN_OOB_BUFFER = 2048


class KeyRef:
    """A reference to the result of the task named ``key`` (a placeholder in args)."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key

    def __repr__(self) -> str:
        return f"KeyRef({self.key!r})"

    @property
    def __zdist_key__(self) -> str:
        return self.key


def _buffer_callback(frames: list[Any]) -> Callable[[pickle.PickleBuffer], bool]:
    def callback(buf: pickle.PickleBuffer) -> bool:
        view = buf.raw()
        if view.nbytes < MIN_OOB_BUFFER:
            return True  # serialise in band
        frames.append(view)
        return False

    return callback


class _ByValue(Exception):
    """Plain pickle would store this by reference where workers cannot find it."""


def _reducer_override(obj: Any) -> Any:
    # Functions and classes of the user's script (``__main__``) exist only in the
    # client: plain pickle would name them, cloudpickle ships them. The C pickler
    # calls this only for objects that are not plain containers or scalars.
    if isinstance(obj, (types.FunctionType, type)) and obj.__module__ == "__main__":
        raise _ByValue
    return NotImplemented


class _Pickler(pickle.Pickler):
    reducer_override = staticmethod(_reducer_override)


_SCALARS = frozenset({type(None), bool, int, float, str, complex})


def dumps(obj: Any) -> list[Any]:
    """Serialise ``obj`` to frames (``[pickle, *buffers]``)."""
    if type(obj) in _SCALARS:  # most tiny tasks' results: no pickler object needed
        return [pickle.dumps(obj, PROTOCOL)]
    frames: list[Any] = [b""]
    try:
        file = io.BytesIO()
        _Pickler(file, PROTOCOL, buffer_callback=_buffer_callback(frames)).dump(obj)
        frames[0] = file.getvalue()
    except Exception:
        del frames[1:]
        frames[0] = cloudpickle.dumps(
            obj, PROTOCOL, buffer_callback=_buffer_callback(frames)
        )
    return frames


def loads(frames: Sequence[Any]) -> Any:
    """Inverse of :func:`dumps`; frames may be bytes, memoryviews or zmq.Frames."""
    head, *buffers = (_buffer(f) for f in frames)
    return pickle.loads(head, buffers=buffers)


def dumps_function(func: Callable[..., Any]) -> bytes:
    """Functions always go through cloudpickle (by value for ``__main__`` code)."""
    return cloudpickle.dumps(func, PROTOCOL)


def nbytes(frames: Sequence[Any]) -> int:
    total = 0
    for f in frames:
        total += f.nbytes if isinstance(f, memoryview) else len(f)
    return total


def _buffer(frame: Any) -> Any:
    # zmq.Frame exposes its memory through .buffer without a copy.
    buf = getattr(frame, "buffer", None)
    return frame if buf is None else buf


# --------------------------------------------------------------------------------------
# arguments with references to other tasks


class _ArgsPickler(pickle.Pickler):
    reducer_override = staticmethod(_reducer_override)

    def __init__(self, file: io.BytesIO, frames: list[Any], deps: dict[str, None]):
        super().__init__(file, PROTOCOL, buffer_callback=_buffer_callback(frames))
        self._deps = deps

    def persistent_id(self, obj: Any) -> str | None:
        key = getattr(obj, "__zdist_key__", None) if type(obj) is not type else None
        if type(key) is str:
            self._deps[key] = None
            return key
        return None


class _ArgsCloudPickler(cloudpickle.Pickler):
    def __init__(self, file: io.BytesIO, frames: list[Any], deps: dict[str, None]):
        super().__init__(file, PROTOCOL, buffer_callback=_buffer_callback(frames))
        self._deps = deps

    def persistent_id(self, obj: Any) -> str | None:
        key = getattr(obj, "__zdist_key__", None) if type(obj) is not type else None
        if type(key) is str:
            self._deps[key] = None
            return key
        return None


def _plain(obj: Any, depth: int = 0) -> bool:
    """Only scalars in small tuples, lists and str-keyed dicts: nothing that can be a
    task reference, a buffer or ``__main__`` code, so the C pickle needs no help."""
    t = type(obj)
    if t in _SCALARS or t is bytes:
        return True
    if depth > 3 or (t is not tuple and t is not list and t is not dict):
        return False
    if len(obj) > 32:
        return False
    if t is dict:
        for k, v in obj.items():
            if type(k) is not str or not _plain(v, depth + 1):
                return False
        return True
    for x in obj:
        if not _plain(x, depth + 1):
            return False
    return True


def dumps_args(obj: Any) -> tuple[list[Any], list[str]]:
    """Serialise task arguments; returns the frames and the referenced keys in order."""
    if _plain(obj):  # a map's ((x,), {}): no pickler object, no persistent ids
        return [pickle.dumps(obj, PROTOCOL)], []
    for pickler_class in (_ArgsPickler, _ArgsCloudPickler):
        frames: list[Any] = [b""]
        deps: dict[str, None] = {}
        file = io.BytesIO()
        try:
            pickler_class(file, frames, deps).dump(obj)
        except Exception:
            if pickler_class is _ArgsCloudPickler:
                raise
            continue
        frames[0] = file.getvalue()
        return frames, list(deps)
    raise AssertionError("unreachable")


class _ArgsUnpickler(pickle.Unpickler):
    def __init__(
        self, file: io.BytesIO, buffers: list[Any], lookup: Callable[[str], Any]
    ):
        super().__init__(file, buffers=buffers)
        self._lookup = lookup

    def persistent_load(self, pid: Any) -> Any:
        return self._lookup(pid)


def loads_args(frames: Sequence[Any], lookup: Callable[[str], Any]) -> Any:
    head, *buffers = (_buffer(f) for f in frames)
    return _ArgsUnpickler(io.BytesIO(head), buffers, lookup).load()
