"""Large values between two workers of one host through shared memory, not sockets.

CurveZMQ encrypts every byte it carries, which caps a worker-to-worker transfer at
well under the memory bandwidth. Two workers of one host and one user need no
encryption between them: the serving worker writes the value's frames (the pickle and
its out-of-band buffers, straight from the buffers, no copy in memory) into a file of
its private directory ``/dev/shm/zdist-<uid>-...`` (mode 0700; files 0600), and
answers over the usual authenticated socket with the file's path and layout. The
receiver opens the file, checks that it is its own user's private regular file, maps it
copy-on-write, unlinks it at once and unpickles with memoryviews into the mapping: a
numpy array then lives in the mapped pages, which count in the receiver's RSS.

Anything that goes wrong (another /dev/shm namespace, a full /dev/shm, a vanished file)
makes that request fall back to the network; no value is ever lost to it. The receiver
offers shared memory only with a token naming its host, user and /dev/shm mount, so the
server does not even try across hosts, users or containers.

``ZDIST_SHM_DIRECTORY`` names another tmpfs directory for it, or ``off`` disables it.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import mmap
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

#: Values whose frames add up to fewer bytes travel in the reply itself: below ~1 MiB a
#: file's create, map and unlink cost more than encrypting the bytes.
MIN_SHM_BYTES = 1 << 20
#: Frames start at page boundaries: numpy gets aligned arrays, and a copy-on-write of
#: one array's page never copies a neighbour's.
ALIGN = mmap.PAGESIZE
ENV = "ZDIST_SHM_DIRECTORY"
DEFAULT_ROOT = "/dev/shm"
#: Linux's madvise(MADV_POPULATE_READ) (5.14+), absent from Python 3.11's mmap module.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
_FILE_NAME = re.compile(r"[0-9a-f]{1,16}")
#: Never map more frames than a message may carry (protocol.MAX_FRAMES_DEFAULT).
_MAX_FRAMES = 4_000_000


class ShmError(Exception):
    """This value cannot come through shared memory: fetch it over the network."""


def shm_root() -> str | None:
    """The directory for transfer files, or None where shared memory is off."""
    root = os.environ.get(ENV, DEFAULT_ROOT)
    if root.lower() in ("", "off", "false", "no", "0"):
        return None
    return os.path.abspath(root)


def host_token(root: str) -> str:
    """Equal for two processes only if each can open the other's files in ``root``:
    same boot (kernel), host name, user and mount of ``root``. "" if unusable."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        st = os.stat(root)
    except OSError:
        return ""
    if not stat.S_ISDIR(st.st_mode) or not os.access(root, os.W_OK | os.X_OK):
        return ""
    return f"{boot}:{socket.gethostname()}:{os.getuid()}:{st.st_dev}"


class SharedMemory:
    """One worker's end of same-host transfers: it writes files as a server and claims
    them as a receiver. :meth:`write` may run in several threads at once; the rest
    belongs to the worker's I/O loop."""

    def __init__(self, root: str | None = None, ttl: float = 30.0) -> None:
        self.root = shm_root() if root is None else root
        self.token = host_token(self.root) if self.root else ""
        #: Seconds an unclaimed file waits for its receiver (the receiver gives up on a
        #: fetch after as long and falls back to the network).
        self.ttl = ttl
        self.directory: str | None = None  # made by prepare() or the first write
        self._uid = os.getuid()
        digest = hashlib.sha1(self.token.encode(), usedforsecurity=False)
        self._prefix = f"zdist-{self._uid}-{digest.hexdigest()[:8]}-"
        self._dir_name = re.compile(
            rf"{re.escape(self._prefix)}[0-9]+-[A-Za-z0-9_]+" if self.token else r"(?!)"
        )
        self._serial = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: deque[tuple[float, str]] = deque()  # (deadline, path), in order
        self.written = 0  # files written (values served through shared memory)

    @property
    def enabled(self) -> bool:
        return bool(self.token)

    def accepts(self, token: str) -> bool:
        """Does a receiver offering ``token`` share this worker's host and /dev/shm?"""
        return bool(self.token) and token == self.token

    # --- serving ----------------------------------------------------------------------

    def write(self, frames: Sequence[Any]) -> tuple[str, list[list[int]]]:
        """Write one value's frames to a new private file: its path and layout
        (``[offset, size]`` per frame). Raises OSError (e.g. /dev/shm full)."""
        views = [_flat(f) for f in frames]
        layout, end = [], 0
        for v in views:
            start = -(-end // ALIGN) * ALIGN
            layout.append([start, v.nbytes])
            end = start + v.nbytes
        with self._lock:
            directory = self._directory()
        fs = os.statvfs(directory)
        if fs.f_bavail * fs.f_frsize < end + (end >> 3):  # keep a margin for others
            raise OSError(28, f"{directory} has too little free space for {end} bytes")
        path = os.path.join(directory, f"{next(self._serial):x}")
        fd = os.open(
            path,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        try:
            for (offset, _), v in zip(layout, views, strict=True):
                _pwrite_all(fd, v, offset)
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        os.close(fd)
        with self._lock:
            self._pending.append((time.monotonic() + self.ttl, path))
            self.written += 1
        return path, layout

    def map_written(self, path: str, layout: list[list[int]]) -> list[memoryview]:
        """Map a file this worker just wrote (before its receiver unlinks it), pages
        untouched: one memoryview per frame, copy-on-write like :meth:`read`'s."""
        spans = [(start, size) for start, size in layout]
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            mapping = _map_private(fd, spans)
        finally:
            os.close(fd)
        return _views(mapping, spans)

    def prepare(self) -> str | None:
        """Make the private directory now (so the worker's janitor knows it);
        None where shared memory is off or the directory cannot be made."""
        if not self.token:
            return None
        try:
            with self._lock:
                return self._directory()
        except OSError as exc:
            logger.warning("no shared memory for transfers: %s", exc)
            self.token = ""
            return None

    def _directory(self) -> str:
        if self.directory is None or not os.path.isdir(self.directory):
            assert self.root is not None
            self._remove_stale()
            self.directory = tempfile.mkdtemp(
                prefix=f"{self._prefix}{os.getpid()}-", dir=self.root
            )
            st = os.lstat(self.directory)
            if st.st_uid != self._uid or st.st_mode & 0o077:  # pragma: no cover
                raise OSError(f"{self.directory} is not private")
        return self.directory

    def _remove_stale(self) -> None:
        """Directories of this user's dead workers on this host that neither they
        nor their janitors removed (both killed at once): tmpfs would hold their
        unclaimed files in memory until reboot."""
        assert self.root is not None
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        for name in names:
            if not self._dir_name.fullmatch(name):
                continue
            pid = int(name[len(self._prefix) :].split("-", 1)[0])
            if pid == os.getpid() or _alive(pid):
                continue
            path = os.path.join(self.root, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and st.st_uid == self._uid:
                logger.info("removing %s, left by a worker that was killed", path)
                shutil.rmtree(path, ignore_errors=True)

    def sweep(self, now: float) -> int:
        """Remove files whose receiver never claimed them; returns how many."""
        removed = 0
        pending = self._pending
        while pending and pending[0][0] <= now:
            with self._lock:
                _, path = pending.popleft()
            removed += _unlink(path)  # usually gone already: the receiver unlinks
        return removed

    @property
    def pending(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        """Remove the directory with every unclaimed file (no write may be running)."""
        with self._lock:
            self._pending.clear()
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)
                self.directory = None

    # --- receiving --------------------------------------------------------------------

    def read(self, path: Any, layout: Any) -> list[memoryview]:
        """Claim a file a peer wrote: map it, unlink it, return one memoryview per
        frame. Raises :class:`ShmError` for anything but this user's private file in
        a transfer directory of this host."""
        if not self.token:
            raise ShmError("shared memory is off here")
        spans = _check_layout(layout)
        directory, name = self._check_path(path)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            dfd = os.open(directory, flags | os.O_DIRECTORY)
        except OSError as exc:
            raise ShmError(f"cannot open {directory}: {exc.strerror}") from None
        try:
            _check_private(os.fstat(dfd), self._uid, directory, stat.S_ISDIR)
            try:
                # O_NONBLOCK: opening a FIFO must fail the checks, not hang the loop.
                fd = os.open(name, flags | os.O_NONBLOCK, dir_fd=dfd)
            except OSError as exc:
                raise ShmError(f"cannot open {path}: {exc.strerror}") from None
            try:
                st = os.fstat(fd)
                _check_private(st, self._uid, path, stat.S_ISREG)
                end = max(start + size for start, size in spans)
                if st.st_size < end:
                    raise ShmError(f"{path} holds {st.st_size} of {end} bytes")
                mapping = _map_private(fd, spans)
            except OSError as exc:
                raise ShmError(f"cannot map {path}: {exc}") from None
            finally:
                os.close(fd)
            _unlink(name, dfd)  # the mapping keeps the pages; the name must go
        finally:
            os.close(dfd)
        _populate(mapping)
        return _views(mapping, spans)

    def _check_path(self, path: Any) -> tuple[str, str]:
        if type(path) is not str:
            raise ShmError(f"bad shared-memory path {path!r}")
        directory, name = os.path.split(path)
        parent, dir_name = os.path.split(directory)
        if (
            parent != self.root
            or not self._dir_name.fullmatch(dir_name)
            or not _FILE_NAME.fullmatch(name)
        ):
            raise ShmError(f"{path!r} is not a transfer file of this host")
        return directory, name


def _check_layout(layout: Any) -> list[tuple[int, int]]:
    if type(layout) is not list or not 0 < len(layout) <= _MAX_FRAMES:
        raise ShmError("bad shared-memory layout")
    spans = []
    for span in layout:
        if (
            type(span) is not list
            or len(span) != 2
            or type(span[0]) is not int
            or type(span[1]) is not int
            or span[0] < 0
            or span[1] < 0
        ):
            raise ShmError(f"bad shared-memory span {span!r}")
        spans.append((span[0], span[1]))
    return spans


def _check_private(st: os.stat_result, uid: int, what: str, is_kind: Any) -> None:
    if not is_kind(st.st_mode):
        kind = "directory" if is_kind is stat.S_ISDIR else "regular file"
        raise ShmError(f"{what} is not a {kind}")
    if st.st_uid != uid or st.st_mode & 0o077:
        raise ShmError(
            f"{what} is owned by uid {st.st_uid} with mode "
            f"{stat.S_IMODE(st.st_mode):o}: not private to uid {uid}"
        )


def _map_private(fd: int, spans: list[tuple[int, int]]) -> mmap.mmap:
    """Copy-on-write, like the network path's writable buffers: a task may change an
    input array without touching the file's pages (which another worker may map)."""
    end = max(start + size for start, size in spans)
    return mmap.mmap(
        fd, end, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
    )


def _views(mapping: mmap.mmap, spans: list[tuple[int, int]]) -> list[memoryview]:
    view = memoryview(mapping)
    return [view[start : start + size] for start, size in spans]


def _populate(mapping: mmap.mmap) -> None:
    """Map every page now, read-only (no copy): the value's memory is in the
    receiver's RSS, where memory limits and spilling look, from the start."""
    try:
        mapping.madvise(_MADV_POPULATE_READ)
    except (OSError, ValueError, AttributeError):  # kernel before 5.14
        bytes(memoryview(mapping)[:: mmap.PAGESIZE])  # one read per page


def _flat(frame: Any) -> memoryview:
    view = memoryview(getattr(frame, "buffer", frame))
    return view if view.ndim == 1 and view.format == "B" else view.cast("B")


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    total = view.nbytes
    while done < total:  # Linux writes at most ~2 GiB per call
        n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:
            raise OSError(f"short write at {offset + done}")
        done += n


def _unlink(name: str, dir_fd: int | None = None) -> int:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        return 0
    return 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, another user's: not ours to judge
    return True
