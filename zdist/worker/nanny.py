"""Start worker processes, watch them, restart them when they crash.

``zworker`` is this supervisor (dask's *nanny*). Each worker is a child running
:mod:`zdist.worker.process`; it gets its configuration and the cluster's keys on stdin
(never argv, which ``ps`` shows to everyone) and exits when that pipe closes, so no
worker outlives its supervisor. Exit status 0 is a planned exit (lifetime, death
timeout, SIGTERM) and is not restarted; anything else is a crash and is.
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
from dataclasses import asdict
from typing import Any

from zdist.worker.memory import process_memory
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


def spawn_worker(
    config: WorkerConfig, log_level: str = "info"
) -> subprocess.Popen[bytes]:
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


class Nanny:
    def __init__(self, configs: list[WorkerConfig], log_level: str = "info") -> None:
        self.configs = configs
        self.log_level = log_level
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * len(configs)
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

    def _check_memory(self, i: int, proc: subprocess.Popen[bytes]) -> None:
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
            if p is not None and p.stdin is not None:
                try:
                    p.stdin.close()
                except OSError:
                    pass


def config_from_json(line: str | bytes) -> WorkerConfig:
    from zdist.security import Security

    data: dict[str, Any] = json.loads(line)
    sec = data.pop("security")
    return WorkerConfig(security=Security.from_dict(sec) if sec else None, **data)
