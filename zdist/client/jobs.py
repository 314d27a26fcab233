"""Batch jobs as records, and what handling them needs besides the cluster.

Job and its states (JobState; Status is the cluster's life), running a batch command
(``_run``: a missing command or a hung one becomes a JobError), quoting a failed
job's output (``_tail``), the private directory on the shared filesystem, and
``_Resources``: what must be released even when the cluster is never closed.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zdist.errors import SecurityError, ZdistError

logger = logging.getLogger(__name__)

#: Seconds a submit or status command may take before it counts as failed.
COMMAND_TIMEOUT = 60.0
#: Lines of a failed job's output quoted in its report.
LOG_TAIL_LINES = 20


class JobError(ZdistError):
    """A job could not be submitted, or jobs ended before their workers connected."""


class Status(enum.Enum):
    """The cluster's life (dask's names)."""

    created = "created"
    """Constructed; the broker is starting."""
    running = "running"
    """The broker runs; jobs may be submitted."""
    closing = "closing"
    """close() is cancelling jobs and stopping the broker."""
    closed = "closed"
    """Every job was cancelled and the broker stopped."""


class JobState(enum.Enum):
    """Where one batch job is."""

    pending = "pending"
    """Queued (or held) by the batch system."""
    running = "running"
    """Started by the batch system; none of its workers has registered yet."""
    connected = "connected"
    """At least one of its workers registered with the broker."""
    finished = "finished"
    """Left the queue after its workers had connected (lifetime, walltime, exit)."""
    failed = "failed"
    """Left the queue before any worker connected; ``reason`` quotes its output."""
    cancelled = "cancelled"
    """Cancelled by scale down, adapt or close."""


@dataclass
class Job:
    """One submitted batch job. ``id`` is what qsub/sbatch printed."""

    id: str
    seq: int
    submit_argv: list[str]
    state: JobState = JobState.pending
    queue_state: str = ""
    submitted_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    workers: set[str] = field(default_factory=set)
    reason: str = ""

    @property
    def number(self) -> str:
        """The numeric part of the id ("123" of "123.gadi-pbs")."""
        m = re.match(r"\d+", self.id)
        return m.group(0) if m else self.id


def _seconds(value: float | str) -> float:
    """1.5, "500ms", "1s", "2m" -> seconds (dask's interval strings)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m|h)?\s*", str(value))
    if not m:
        raise ValueError(f"{value!r} is not a duration like 1.5, '500ms' or '2s'")
    return (
        float(m.group(1))
        * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    )


def _private_directory(base: str | os.PathLike[str] | None) -> Path:
    """A fresh 0700 directory for the scheduler file and job scripts.

    ``base`` must be on a filesystem the compute nodes share (home, /scratch); by
    default ``~/.zdist/clusters``.
    """
    if base is None:
        root = Path.home() / ".zdist" / "clusters"
        for d in (root.parent, root):
            if not d.exists():
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
    else:
        root = Path(base).expanduser().absolute()
        root.mkdir(parents=True, exist_ok=True)
    mode = root.stat().st_mode
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        # Another user could rename our directory away and put their own in its place.
        raise SecurityError(
            f"refusing to use {root}: it is world-writable without the sticky bit"
        )
    return Path(tempfile.mkdtemp(prefix="cluster-", dir=root))  # mode 0700


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _run(
    argv: Sequence[str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise JobError(
            f"{argv[0]} not found on PATH: this cluster submits jobs with "
            f"{argv[0]}; run it on a login node of the batch system (or load the "
            f"module that provides {argv[0]})"
        ) from None
    except subprocess.TimeoutExpired:
        raise JobError(
            f"{' '.join(argv)} did not answer within {COMMAND_TIMEOUT:.0f} s"
        ) from None


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return "\n".join(s.strip() for s in (result.stderr, result.stdout) if s.strip())


class _Resources:
    """What must be released even if the cluster is never closed: the jobs, the
    private client, the broker and the private directory (weakref.finalize's
    target, so it holds no reference to the cluster)."""

    def __init__(self, cancel_command: str) -> None:
        self.cancel_command = cancel_command
        self.lock = threading.RLock()
        self.stop = threading.Event()
        self.jobs: dict[str, Job] = {}
        self.client: Any = None
        self.broker: Any = None
        self.directory: Path | None = None

    def cancel(self, jobs: Iterable[Job]) -> None:
        ids = [j.id for j in jobs]
        if not ids:
            return
        try:
            result = _run([self.cancel_command, *ids])
        except JobError as exc:
            logger.warning("cannot cancel jobs %s: %s", " ".join(ids), exc)
            return
        if result.returncode != 0:
            # Usually a job that ended meanwhile; the next poll tells.
            logger.debug(
                "%s %s: %s", self.cancel_command, " ".join(ids), _output(result)
            )

    def release(self) -> None:
        self.stop.set()
        locked = self.lock.acquire(timeout=COMMAND_TIMEOUT)
        try:
            jobs = list(self.jobs.values())
            self.jobs.clear()
            self.cancel(jobs)
            client, self.client = self.client, None
            if client is not None:
                try:
                    client.close()
                except Exception:  # best effort at interpreter exit
                    logger.debug("closing the cluster's client failed", exc_info=True)
            broker, self.broker = self.broker, None
            if broker is not None:
                broker.close()
            directory, self.directory = self.directory, None
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
        finally:
            if locked:
                self.lock.release()
