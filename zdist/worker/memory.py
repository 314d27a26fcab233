"""A worker's results in memory and, past a threshold, on disk (dask's spilling).

Thresholds follow dask's worker memory management, as fractions of the memory limit:

- ``target`` (0.6): results beyond this many bytes (by their pickled size) move to disk,
  least recently used first, and come back when a task needs them;
- ``spill`` (0.7): the same, when the whole process's memory is above it;
- ``pause`` (0.8): the worker stops taking new tasks until memory falls again;
- ``terminate`` (0.95): the supervising zworker restarts the worker process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

from zdist import serialize

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryThresholds:
    target: float | None = 0.6
    spill: float | None = 0.7
    pause: float | None = 0.8
    terminate: float | None = 0.95


def process_memory(pid: int | str = "self") -> int:
    """Resident set size in bytes (Linux /proc; 0 where unavailable)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class SpillBuffer(MutableMapping[str, Any]):
    """A mapping of key -> value that keeps at most ``target`` bytes in memory.

    Task threads read it while the worker's I/O loop writes it: a spilled value is on
    disk before it leaves memory, so a reader always finds it in one of the two.
    """

    def __init__(self, directory: str, target: int | None) -> None:
        self.directory = os.path.join(directory, "spill")
        self.target = target
        self.fast: OrderedDict[str, Any] = OrderedDict()
        self.slow: dict[str, str] = {}  # key -> file
        self.sizes: dict[str, int] = {}
        self.fast_bytes = 0
        self.spilled_total = 0
        self._lock = threading.Lock()

    # --- mapping ----------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        try:
            value = self.fast[key]
        except KeyError:
            path = self.slow[key]  # KeyError if absent: the mapping contract
            return self._unspill(key, path)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self.put(key, value, 0)

    def put(self, key: str, value: Any, nbytes: int) -> None:
        with self._lock:
            self._discard(key)
            self.fast[key] = value
            self.sizes[key] = nbytes
            self.fast_bytes += nbytes
        if self.target is not None and self.fast_bytes > self.target:
            self.evict(self.target)

    def swap(self, key: str, old: Any, new: Any) -> bool:
        """Hold ``new`` for ``key`` in place of ``old`` (same size, same place in
        the spill order), only if ``old`` is still what is held in memory."""
        with self._lock:
            if self.fast.get(key) is not old:
                return False
            self.fast[key] = new
            return True

    def __delitem__(self, key: str) -> None:
        with self._lock:
            if key not in self.fast and key not in self.slow:
                raise KeyError(key)
            self._discard(key)

    def discard(self, key: str) -> None:
        """Forget ``key`` if present (without reading it back from disk)."""
        with self._lock:
            self._discard(key)

    def _discard(self, key: str) -> None:
        if key in self.fast:
            del self.fast[key]
            self.fast_bytes -= self.sizes.get(key, 0)
        path = self.slow.pop(key, None)
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.sizes.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self.fast or key in self.slow

    def __iter__(self) -> Iterator[str]:
        return iter([*self.fast, *self.slow])

    def __len__(self) -> int:
        return len(self.fast) + len(self.slow)

    # --- spilling ---------------------------------------------------------------------

    def evict(self, below: int) -> int:
        """Move least recently used values to disk until memory holds ``below``."""
        moved = 0
        while self.fast_bytes > below and self.fast:
            with self._lock:
                key, value = next(iter(self.fast.items()))
                path = self._path(key)
            try:
                self._write(path, value)
            except Exception as exc:  # unpicklable or disk full: keep it in memory
                logger.warning("could not spill %s: %s", key, exc)
                with self._lock:
                    self.fast.move_to_end(key)
                return moved
            with self._lock:
                if self.fast.get(key) is value:
                    self.slow[key] = path
                    del self.fast[key]
                    self.fast_bytes -= self.sizes.get(key, 0)
                    moved += 1
                    self.spilled_total += 1
        return moved

    def _unspill(self, key: str, path: str) -> Any:
        value = self._read(path)
        with self._lock:
            if self.slow.get(key) == path:
                del self.slow[key]
                self.fast[key] = value
                self.fast_bytes += self.sizes.get(key, 0)
                try:
                    os.unlink(path)
                except OSError:
                    pass
        if self.target is not None and self.fast_bytes > self.target:
            self.evict(self.target)
        return value

    def _path(self, key: str) -> str:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        name = hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()
        return os.path.join(self.directory, name)

    @staticmethod
    def _write(path: str, value: Any) -> None:
        frames = serialize.dumps(value)
        tmp = f"{path}.{threading.get_ident()}.tmp"
        with open(tmp, "wb") as f:
            f.write(len(frames).to_bytes(4, "little"))
            for frame in frames:
                view = memoryview(frame).cast("B")
                f.write(len(view).to_bytes(8, "little"))
                f.write(view)
        os.replace(tmp, path)

    @staticmethod
    def _read(path: str) -> Any:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(4), "little")
            frames = []
            for _ in range(n):
                size = int.from_bytes(f.read(8), "little")
                frames.append(f.read(size))
        return serialize.loads(frames)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
