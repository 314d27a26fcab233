"""Start worker processes, watch them, restart them when they crash.

``zworker`` is this supervisor (dask's *nanny*). On Linux each worker is forked from it:
the supervisor has already imported everything a worker runs, so a worker (or a
restart) is up in milliseconds rather than after a fresh interpreter's 0.15-0.2 s of
imports. Elsewhere each worker is a fresh ``python -m zdist.worker.process`` that gets
its configuration and the cluster's keys on stdin (never argv, which ``ps`` shows to
everyone). Either way the worker's stdin is a pipe from the supervisor and the worker
exits when it closes, so no worker outlives its supervisor. Exit status 0 is a planned
exit (lifetime, death timeout, SIGTERM) and is not restarted; anything else is a crash
and is.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import IO

from zdist._lifeline import exit_now
from zdist.worker.memory import process_memory
from zdist.worker.process import run_worker
from zdist.worker.worker import WorkerConfig

logger = logging.getLogger(__name__)

#: Restarts allowed per worker within RESTART_WINDOW before the supervisor gives up.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: Seconds a SIGTERM'd worker gets to finish running tasks before SIGKILL.
GRACE_PERIOD = 30.0

_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def worker_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a worker process: one BLAS/OpenMP thread unless the user chose,
    as dask's nanny does, so nthreads tasks do not oversubscribe a 48-core node."""
    env = dict(os.environ if base is None else base)
    for var in _THREAD_VARS:
        env.setdefault(var, "1")
    return env


#: Fork workers from the supervisor where that is safe: Linux. (macOS system libraries
#: may abort in a forked child that has not exec'd.)
FORK = sys.platform.startswith("linux")


def spawn_worker(
    config: WorkerConfig, log_level: str = "info"
) -> subprocess.Popen[bytes]:
    """A worker in a fresh interpreter (``python -m zdist.worker.process``)."""
    cfg = asdict(config)
    cfg["security"] = config.security.to_dict() if config.security else None
    proc = subprocess.Popen(
        [sys.executable, "-m", "zdist.worker.process", "--log-level", log_level],
        stdin=subprocess.PIPE,
        env={**worker_environment(), **config.env},
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(cfg).encode() + b"\n")
    proc.stdin.flush()  # keep it open: its end of file tells the worker we are gone
    return proc


class ForkedWorker:
    """A worker forked from this process, with the part of Popen's interface that
    :class:`Nanny` uses (``pid``, ``stdin``, ``poll``, ``wait``, ``send_signal``,
    ``kill``).

    Fork only from a process that has no ZeroMQ context and no thread holding a lock a
    worker needs: the supervisor qualifies (its only other thread waits in ``os.read``
    on its own lifeline). ``close_fds`` are this process's pipes to its other workers:
    the child closes its copies, so each worker's lifeline closes with the supervisor.
    """

    def __init__(self, config: WorkerConfig, close_fds: Sequence[int] = ()) -> None:
        env = {**worker_environment(), **config.env}
        read_end, write_end = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # or the child would write our buffered output again
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the supervisor's code
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.dup2(read_end, 0)
                for fd in (read_end, write_end, *close_fds):
                    os.close(fd)
                os.environ.update(env)
                code = run_worker(config)
            except BaseException:
                logger.exception("worker %s failed", config.name)
            finally:
                exit_now(code)
        os.close(read_end)
        self.pid = pid
        self.stdin: IO[bytes] | None = os.fdopen(write_end, "wb", buffering=0)
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        if self.returncode is None and self._lock.acquire(blocking=False):
            try:
                if self.returncode is None:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                    if pid == self.pid:
                        self.returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                self.returncode = 0  # reaped elsewhere, as Popen assumes
            finally:
                self._lock.release()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        # Popen.wait(timeout) polls the same way: waitpid has no timeout.
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Nanny:
    def __init__(self, configs: list[WorkerConfig], log_level: str = "info") -> None:
        self.configs = configs
        self.log_level = log_level
        self.procs: list[subprocess.Popen[bytes] | ForkedWorker | None] = [None] * len(
            configs
        )
        self.restarts: list[list[float]] = [[] for _ in configs]
        self._stopping = threading.Event()

    def run(self) -> int:
        for i in range(len(self.configs)):
            self._start(i)
        while True:
            alive = False
            for i, proc in enumerate(self.procs):
                if proc is None:
                    continue
                code = proc.poll()
                if code is None:
                    alive = True
                    self._check_memory(i, proc)
                    continue
                self.procs[i] = None
                _close(proc.stdin)
                if code == 0 or self._stopping.is_set():
                    logger.info("worker %s exited (%s)", self.configs[i].name, code)
                    continue
                if self._may_restart(i):
                    logger.warning(
                        "worker %s died (exit %s); restarting",
                        self.configs[i].name,
                        code,
                    )
                    self._start(i)
                    alive = True
                else:
                    logger.error(
                        "worker %s keeps dying; giving up", self.configs[i].name
                    )
            if not alive:
                return 0
            self._stopping.wait(0.1)

    def _check_memory(
        self, i: int, proc: subprocess.Popen[bytes] | ForkedWorker
    ) -> None:
        cfg = self.configs[i]
        frac = cfg.memory_terminate_fraction
        if not cfg.memory_limit or not frac:
            return
        rss = process_memory(proc.pid)
        if rss > frac * cfg.memory_limit:
            logger.warning(
                "worker %s uses %d MB, above %d%% of its %d MB limit; restarting it",
                cfg.name,
                rss >> 20,
                int(frac * 100),
                cfg.memory_limit >> 20,
            )
            proc.kill()

    def _start(self, i: int) -> None:
        if FORK:
            pipes = [
                p.stdin.fileno()
                for p in self.procs
                if p and p.stdin and not p.stdin.closed
            ]
            self.procs[i] = ForkedWorker(self.configs[i], pipes)
        else:
            self.procs[i] = spawn_worker(self.configs[i], self.log_level)

    def _may_restart(self, i: int) -> bool:
        now = time.monotonic()
        recent = [t for t in self.restarts[i] if now - t < RESTART_WINDOW]
        recent.append(now)
        self.restarts[i] = recent
        return len(recent) <= MAX_RESTARTS

    def stop(self, graceful: bool = True) -> None:
        """SIGTERM every worker (they hand work back and exit), SIGKILL stragglers."""
        self._stopping.set()
        procs = [p for p in self.procs if p is not None]
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + GRACE_PERIOD
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def close_stdin(self) -> None:
        for p in self.procs:
            if p is not None:
                _close(p.stdin)


def _close(f: IO[bytes] | None) -> None:
    if f is not None:
        try:
            f.close()
        except OSError:
            pass
