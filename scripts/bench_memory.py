"""Process trees and memory from /proc, for scripts/bench.py.

No psutil: the benchmark reads /proc/<pid>/stat and /proc/<pid>/statm directly, so
what it measures is plain to see (and Linux-only, like zdist's target machines).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable

MiB = 2**20

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses; ppid follows it.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children[ppid].append(int(entry.name))
    return children


def descendants(root: int) -> list[int]:
    children = _children_map()
    found: list[int] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def process_tree(root: int | None = None) -> list[int]:
    """This process and all of its descendants: the client and the whole cluster.

    For dask that includes the scheduler, which LocalCluster runs in this process;
    for zdist the broker and the workers are child processes.
    """
    root = os.getpid() if root is None else root
    return [root, *descendants(root)]


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0  # the process has exited


def total_rss(pids: list[int]) -> int:
    return sum(rss_bytes(pid) for pid in pids)


class PeakRss:
    """Samples the summed RSS of a set of processes in a background thread.

    `baseline` is taken on entry, `peak` covers the whole block including one last
    sample on exit, so keep the data alive until the block ends. 10 ms sampling
    costs a few /proc reads per tick; the set of pids is refreshed every 0.25 s
    because a cluster may start processes while it runs.
    """

    def __init__(
        self,
        pids: Callable[[], list[int]],
        interval: float = 0.01,
        refresh: float = 0.25,
    ) -> None:
        self._pids_fn = pids
        self._interval = interval
        self._refresh = refresh
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.baseline = 0
        self.peak = 0

    def __enter__(self) -> PeakRss:
        self._pids = self._pids_fn()
        self.baseline = self.peak = total_rss(self._pids)
        self._thread.start()
        return self

    def _run(self) -> None:
        next_refresh = time.monotonic() + self._refresh
        while not self._stop.wait(self._interval):
            if time.monotonic() >= next_refresh:
                self._pids = self._pids_fn()
                next_refresh = time.monotonic() + self._refresh
            self.peak = max(self.peak, total_rss(self._pids))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, total_rss(self._pids_fn()))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def wait_for_steady_rss(
    pids: Callable[[], list[int]], timeout: float = 10.0, tolerance: int = 2 * MiB
) -> int:
    """Wait until the processes' summed RSS stops moving (data from the previous
    repetition being released), so each repetition starts from a true idle baseline."""
    gc.collect()
    deadline = time.monotonic() + timeout
    last = total_rss(pids())
    steady = 0
    while time.monotonic() < deadline and steady < 3:
        time.sleep(0.1)
        now = total_rss(pids())
        steady = steady + 1 if abs(now - last) <= tolerance else 0
        last = now
    return last


def reap_leftovers(timeout: float = 15.0) -> list[str]:
    """Every cluster is closed by now; wait for its processes to go, and end (by pid)
    any child of this run that is still there, so a benchmark never leaves a process
    behind. multiprocessing's resource tracker is expected: it exits with us."""

    def leftovers() -> list[tuple[int, str]]:
        found = []
        for pid in descendants(os.getpid()):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if "resource_tracker" not in cmd:
                found.append((pid, cmd))
        return found

    deadline = time.monotonic() + timeout
    found = leftovers()
    while found and time.monotonic() < deadline:
        time.sleep(0.2)
        found = leftovers()
    for pid, cmd in found:
        print(f"warning: process {pid} outlived its cluster, terminating: {cmd[:200]}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    return [f"{pid} {cmd[:200]}" for pid, cmd in found]
