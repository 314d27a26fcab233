"""JobQueueCluster: workers in batch jobs, with dask-jobqueue's API.

The batch systems' subclasses are PBSCluster (pbs.py) and SLURMCluster (slurm.py).

The broker runs as a child ``zbroker`` of this Python process (as with LocalCluster)
and writes its address and keys to a scheduler file (mode 0600) in a private
directory on the shared filesystem; each batch job runs ``zworker --scheduler-file``
on that path, so no secret appears in a job script or a command line (``qstat -f``
and ``ps`` show both to every user). ``scheduler_file=`` joins an already running
``zbroker`` instead.

A monitor thread polls the queue (``squeue``/``qstat``) and the broker: it matches
workers to jobs by name (``{job_name}-{job id}``, suffixed ``-0``, ``-1`` with several
processes per job), reports a job that leaves the queue before any of its workers
registered (``failed_jobs``, ``wait_for_workers`` raises), replaces jobs that end
(lifetime, walltime) while ``scale`` or ``adapt`` still wants them, and runs ``adapt``.
After ``MAX_CONSECUTIVE_FAILURES`` failed jobs in a row it stops submitting until
``scale`` is called again, so a broken setup is not resubmitted forever.

``close()`` cancels every job the cluster submitted, also when the cluster is garbage
collected or the interpreter exits; the broker's lifeline takes it down even when this
process is killed (its workers then leave after ``death_timeout``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from zdist.client.adaptive import Adaptive
from zdist.client.jobs import (
    COMMAND_TIMEOUT,
    Job,
    JobError,
    JobState,
    Status,
    _output,
    _private_directory,
    _Resources,
    _run,
    _seconds,
    _tail,
)
from zdist.client.jobscript import JobSpec, parse_memory
from zdist.errors import SecurityError
from zdist.security import Security, read_json_file

logger = logging.getLogger(__name__)

#: Jobs in a row that may end before their workers connect before the cluster stops
#: submitting (until the next scale()): a wrong python or prologue fails every job.
MAX_CONSECUTIVE_FAILURES = 3
#: Seconds between queue polls. Schedulers count qstat/squeue calls; 5 s is gentle on
#: a shared PBS server and still notices a dead job quickly.
DEFAULT_POLL_INTERVAL = 5.0


class JobQueueCluster:
    """Workers in batch jobs; subclasses name the batch system's commands."""

    submit_command = ""
    cancel_command = ""
    #: The batch system's job states that mean queued / running (see _classify).
    PENDING: frozenset[str] = frozenset()
    RUNNING: frozenset[str] = frozenset()

    def __init__(
        self,
        cores: int,
        memory: str | int | None,
        processes: int | None = None,
        queue: str | None = None,
        account: str | None = None,
        walltime: str | None = "00:30:00",
        job_name: str = "zworker",
        resource_spec: str | None = None,
        job_extra_directives: Iterable[str] = (),
        job_directives_skip: Iterable[str] = (),
        job_script_prologue: Iterable[str] = (),
        job_script_epilogue: Iterable[str] = (),
        shebang: str = "#!/usr/bin/env bash",
        python: str = sys.executable,
        local_directory: str | None = None,
        interface: str | None = None,
        log_directory: str | None = None,
        death_timeout: float | None = 60,
        worker_extra_args: Iterable[str] = (),
        scheduler_options: dict[str, Any] | None = None,
        n_workers: int = 0,
        *,
        lifetime: float | str | None = None,
        shared_temp_directory: str | os.PathLike[str] | None = None,
        scheduler_file: str | None = None,
        poll_interval: float | str = DEFAULT_POLL_INTERVAL,
        security: bool = True,
    ) -> None:
        self.status = Status.created
        if isinstance(memory, int) and not isinstance(memory, bool):
            memory = str(memory)
        self._log_directory = (
            None
            if log_directory is None
            else Path(log_directory).expanduser().absolute()
        )
        # Validate everything before starting a process: a typo fails here.
        probe = self._spec(
            cores=cores,
            memory=memory,
            processes=processes,
            queue=queue,
            account=account,
            walltime=walltime,
            job_name=job_name,
            resource_spec=resource_spec,
            job_extra_directives=tuple(job_extra_directives),
            job_directives_skip=tuple(job_directives_skip),
            job_script_prologue=tuple(job_script_prologue),
            job_script_epilogue=tuple(job_script_epilogue),
            shebang=shebang,
            python=python,
            local_directory=local_directory,
            interface=interface,
            log_directory=None if log_directory is None else str(self._log_directory),
            death_timeout=death_timeout,
            worker_extra_args=tuple(worker_extra_args),
            lifetime=lifetime,
            scheduler_file="/scheduler.json",
        )
        self.job_name = job_name
        self.poll_interval = _seconds(poll_interval)
        self._res = _Resources(self.cancel_command)
        self._finalizer = weakref.finalize(self, self._res.release)
        self._target = 0
        self._seq = 0
        self._failures = 0
        self._history: collections.deque[Job] = collections.deque(maxlen=1000)
        self._adaptive: Adaptive | None = None
        self._last_poll = 0.0
        self._broker_workers: dict[str, dict[str, Any]] = {}
        self._tasks: dict[str, int] = {}
        self.dashboard_link: str | None = None
        try:
            if scheduler_file is not None:
                self.scheduler_file = str(Path(scheduler_file).expanduser().absolute())
                info = read_json_file(self.scheduler_file)
                address = info.get("address")
                if not isinstance(address, str):
                    raise SecurityError(f"{scheduler_file} holds no broker address")
                self.scheduler_address = address
                sec = info.get("security")
                self.security: Security | bool = (
                    Security.from_dict(sec) if sec else False
                )
                self._directory = _private_directory(shared_temp_directory)
                self._res.directory = self._directory
            else:
                self._directory = _private_directory(shared_temp_directory)
                self._res.directory = self._directory
                self.scheduler_file = str(self._directory / "scheduler.json")
                self._start_broker(interface, scheduler_options or {}, security)
            self.spec = dataclasses.replace(probe, scheduler_file=self.scheduler_file)
            if self._log_directory is not None:
                self._log_directory.mkdir(parents=True, exist_ok=True)
            self.status = Status.running
            self._monitor = threading.Thread(
                target=_monitor_loop,
                args=(weakref.ref(self), self._res.stop),
                name=f"zdist-{type(self).__name__}-monitor",
                daemon=True,
            )
            self._monitor.start()
            if n_workers:
                self.scale(n_workers)
        except BaseException:
            self.close(timeout=0)
            raise

    # ----------------------------------------------------------------------------------
    # construction helpers

    def _spec(self, **kwargs: Any) -> JobSpec:
        return JobSpec(**kwargs)

    def _start_broker(
        self, interface: str | None, options: dict[str, Any], security: bool
    ) -> None:
        from zdist.client.local import BrokerProcess

        opts = dict(options)
        broker_interface = opts.pop("interface", interface)
        host = opts.pop("host", None)
        port = int(opts.pop("port", 0) or 0)
        for ignored in ("dashboard_address", "protocol"):
            opts.pop(ignored, None)
        if opts:
            raise TypeError(
                f"scheduler_options supports interface, host and port, not "
                f"{sorted(opts)}"
            )
        if security:
            self.security = Security.temporary()
        else:
            self.security = False
            logger.warning(
                "%s without security: anyone who can reach the broker can run code "
                "as you",
                type(self).__name__,
            )
        # Without an interface or host, listen on every interface: the compute nodes
        # reach the login node by its hostname's address, not 127.0.0.1.
        self._res.broker = BrokerProcess(
            self.security if isinstance(self.security, Security) else None,
            host=host or "0.0.0.0",
            port=port,
            interface=broker_interface,
            scheduler_file=self.scheduler_file,
        )
        self.scheduler_address = self._res.broker.address

    # ----------------------------------------------------------------------------------
    # the job script

    def job_script(self) -> str:
        """The batch script each job runs (a pure render of the parameters)."""
        raise NotImplementedError

    @property
    def job_header(self) -> str:
        return "\n".join(
            ln for ln in self.job_script().splitlines() if ln.startswith("#")
        )

    @property
    def worker_processes(self) -> int:
        return self.spec.worker_processes

    # ----------------------------------------------------------------------------------
    # jobs

    @property
    def jobs(self) -> dict[str, Job]:
        """Jobs submitted and not yet ended (pending, running or connected), by id."""
        with self._res.lock:
            return dict(self._res.jobs)

    @property
    def job_ids(self) -> list[str]:
        return list(self.jobs)

    @property
    def job_history(self) -> list[Job]:
        """Jobs that ended (finished, failed or cancelled), oldest first."""
        with self._res.lock:
            return list(self._history)

    @property
    def failed_jobs(self) -> list[Job]:
        """Jobs that left the queue before any of their workers connected."""
        return [j for j in self.job_history if j.state is JobState.failed]

    def _submit_job(self) -> Job:
        script = self.job_script()
        path = self._directory / f"{self.job_name}.sh"
        path.write_text(script)
        argv = [self.submit_command, str(path)]
        # The batch system writes the job's output into the submit directory unless
        # told otherwise (Torque's qsub passes its own -o/-e to sbatch, ignoring
        # #PBS -o/-e), so submit from the log directory or the private one.
        cwd = self._log_directory or self._directory
        result = _run(argv, cwd=cwd)
        if result.returncode != 0:
            raise JobError(
                f"{self.submit_command} rejected the job script "
                f"(exit {result.returncode}): {_output(result)}\n"
                f"The script was:\n{script}"
            )
        job_id = self._parse_job_id(result.stdout)
        if job_id is None:
            raise JobError(
                f"found no job id in the output of {' '.join(argv)}: {_output(result)}"
            )
        self._seq += 1
        job = Job(job_id, self._seq, argv)
        self._res.jobs[job_id] = job
        logger.info("submitted job %s (%s)", job_id, self.job_name)
        return job

    def _parse_job_id(self, stdout: str) -> str | None:
        lines = [ln for ln in stdout.splitlines() if ln.strip()]
        m = re.search(r"\d+(?:\.[A-Za-z0-9_.-]+)?", lines[-1]) if lines else None
        return m.group(0) if m else None

    def _queue_states(self, jobs: list[Job]) -> dict[str, str]:
        """Raw batch-system states of ``jobs`` still listed, by job number.

        Raises JobError when the queue cannot be read (the caller retries later).
        """
        raise NotImplementedError

    def _classify(self, raw: str | None) -> JobState | None:
        """pending/running for a raw state (one of the batch system's PENDING or
        RUNNING codes), None for one that has left the queue."""
        if raw in self.PENDING:
            return JobState.pending
        if raw in self.RUNNING:
            return JobState.running
        return None

    def _job_logs(self, job: Job) -> list[Path]:
        pattern = re.compile(rf"(^|[^0-9]){re.escape(job.number)}([^0-9]|$)")
        found = []
        for d in {self._log_directory or self._directory, self._directory}:
            try:
                found += [p for p in d.iterdir() if pattern.search(p.name)]
            except OSError:
                pass
        return sorted(found)

    def _failure_report(self, job: Job) -> str:
        left = job.queue_state or "no longer listed"
        text = (
            f"job {job.id} left the queue ({left}) before any worker registered as "
            f"{self.job_name}-{job.id}"
        )
        for p in self._job_logs(job):
            tail = _tail(p)
            if tail:
                text += f"\n--- last lines of {p} ---\n{tail}"
        return text

    # ----------------------------------------------------------------------------------
    # the monitor's step: read the queue and the broker, then act

    def _control(self) -> Any:
        if self._res.client is None:
            from zdist.client.client import Client

            self._res.client = Client(
                self.scheduler_address,
                security=self.security or False,
                set_as_default=False,
                timeout=30,
            )
        return self._res.client

    def _read_broker(self) -> None:
        info = self._control().scheduler_info()
        self._broker_workers = {
            w["name"]: w for w in info["workers"].values() if isinstance(w["name"], str)
        }
        self._tasks = dict(info.get("tasks", {}))

    def _job_of_worker(self, name: str) -> str | None:
        prefix = f"{self.job_name}-"
        if not name.startswith(prefix):
            return None
        m = re.match(r"\d+", name[len(prefix) :])
        return m.group(0) if m else None

    def _refresh(self, poll_queue: bool = True) -> None:
        """Update every job's state from the queue and the broker (lock held)."""
        jobs = list(self._res.jobs.values())
        states: dict[str, str] | None = None
        if poll_queue and jobs:
            states = self._queue_states(jobs)
            self._last_poll = time.monotonic()
        # After the queue: a worker that registers in between is seen as connected.
        self._read_broker()
        by_number: dict[str, list[str]] = {}
        for name in self._broker_workers:
            number = self._job_of_worker(name)
            if number is not None:
                by_number.setdefault(number, []).append(name)
        for job in jobs:
            names = by_number.get(job.number, [])
            if names:
                job.workers.update(names)
                if job.state is not JobState.connected:
                    logger.info("job %s: workers %s connected", job.id, names)
                job.state = JobState.connected
                self._failures = 0
            if states is None:
                continue
            raw = states.get(job.number)
            job.queue_state = raw or job.queue_state
            cls = self._classify(raw)
            if cls is None:
                self._ended(job)
            elif job.state is not JobState.connected:
                job.state = cls

    def _ended(self, job: Job) -> None:
        self._res.jobs.pop(job.id, None)
        job.ended_at = time.time()
        if job.state is JobState.connected or job.workers:
            job.state = JobState.finished
            logger.info("job %s ended (%s)", job.id, job.queue_state or "gone")
        else:
            job.state = JobState.failed
            job.reason = self._failure_report(job)
            self._failures += 1
            logger.warning("%s", job.reason)
        self._history.append(job)

    def _reconcile(self) -> None:
        """Submit or cancel jobs until the active ones match the target (lock held)."""
        active = list(self._res.jobs.values())
        missing = self._target - len(active)
        if missing > 0:
            if self._failures >= MAX_CONSECUTIVE_FAILURES:
                return
            for _ in range(missing):
                self._submit_job()
        elif missing < 0:
            self._cancel(self._cancel_order(active)[:-missing])

    def _cancel_order(self, jobs: list[Job]) -> list[Job]:
        """Queued jobs first, then started ones whose workers have not connected,
        then connected ones with the fewest tasks in hand; newest first among equals
        (the oldest queued job is the closest to starting)."""

        def busy(job: Job) -> int:
            return sum(
                int(self._broker_workers.get(n, {}).get("processing", 0))
                for n in job.workers
            )

        rank = {JobState.pending: 0, JobState.running: 1, JobState.connected: 2}
        return sorted(jobs, key=lambda j: (rank.get(j.state, 0), busy(j), -j.seq))

    def _cancel(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._res.jobs.pop(job.id, None)
            job.state = JobState.cancelled
            job.ended_at = time.time()
            self._history.append(job)
        if jobs:
            logger.info("cancelling jobs %s", " ".join(j.id for j in jobs))
            self._res.cancel(jobs)

    def _step(self) -> None:
        """One monitor turn: poll, adapt, reconcile."""
        with self._res.lock:
            if self.status is not Status.running:
                return
            if not (self._res.jobs or self._target or self._adaptive):
                return  # idle: nothing to watch
            due = time.monotonic() - self._last_poll >= self.poll_interval
            self._refresh(poll_queue=due)
            adaptive = self._adaptive
            if adaptive is not None:
                outstanding = sum(
                    self._tasks.get(s, 0) for s in ("ready", "waiting", "processing")
                )
                self._target = adaptive.recommendation(
                    outstanding, self.spec.cores, len(self._res.jobs)
                )
                adaptive.log.append((time.time(), self._target))
            if self._target < len(self._res.jobs) and not due:
                self._refresh()  # cancel queued jobs first: read the queue now
            try:
                self._reconcile()
            except JobError as exc:
                self._failures += 1
                logger.error("%s", exc)

    def _tick(self) -> float:
        adaptive = self._adaptive
        return min(self.poll_interval, adaptive.interval if adaptive else math.inf)

    # ----------------------------------------------------------------------------------
    # public API

    def scale(
        self,
        n: int | None = None,
        jobs: int = 0,
        memory: str | int | None = None,
        cores: int | None = None,
    ) -> None:
        """Ask for ``n`` workers, or ``jobs`` jobs, or enough for ``cores``/``memory``.

        Submits the missing jobs now (a rejected script raises JobError with the
        batch system's message); scaling down cancels queued jobs before running
        ones. Turns adapt() off. Jobs that end are replaced while the target stands.
        """
        if jobs:
            target = jobs
        elif n is not None:
            target = math.ceil(n / self.worker_processes)
        elif cores is not None:
            target = math.ceil(cores / self.spec.cores)
        elif memory is not None:
            total = self.spec.total_memory
            if total is None:
                raise ValueError("scale(memory=...) needs the cluster's memory=")
            target = math.ceil(parse_memory(memory) / total)
        else:
            target = 0
        if target < 0:
            raise ValueError(f"cannot scale to {target} jobs")
        if self.status is not Status.running:
            raise JobError(f"cannot scale a cluster that is {self.status.value}")
        if self._adaptive is not None:
            logger.info("scale() turns adaptive scaling off")
            self._adaptive = None
        with self._res.lock:
            self._target = target
            self._failures = 0
            if target < len(self._res.jobs):
                self._refresh()
            try:
                self._reconcile()
            except JobError:
                self._target = len(self._res.jobs)
                raise

    def adapt(
        self,
        *args: Any,
        minimum_jobs: int | None = None,
        maximum_jobs: int | None = None,
        minimum: int | None = None,
        maximum: int | None = None,
        interval: float | str = "1s",
        wait_count: int = 3,
        target_duration: Any = None,
    ) -> Adaptive:
        """Scale between ``minimum_jobs`` and ``maximum_jobs`` with the work queued
        (``minimum``/``maximum`` count workers instead). Returns the Adaptive; its
        ``stop()`` (or a call to ``scale``) turns adaptivity off."""
        if args:
            raise TypeError("adapt() takes keyword arguments only")
        per_job = self.worker_processes
        low = (
            minimum_jobs
            if minimum_jobs is not None
            else math.ceil((minimum or 0) / per_job)
        )
        high: float = (
            maximum_jobs
            if maximum_jobs is not None
            else (math.inf if maximum is None else maximum // per_job)
        )
        self._adaptive = Adaptive(self, low, high, interval, wait_count)
        with self._res.lock:
            self._failures = 0
        return self._adaptive

    def wait_for_workers(
        self, n_workers: int = 1, timeout: float | None = None
    ) -> None:
        """Block until ``n_workers`` workers registered; raise JobError as soon as
        the cluster gave up on jobs that end before their workers connect."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._res.lock:
                self._refresh(poll_queue=False)
                count = len(self._broker_workers)
                failed = self._failures >= MAX_CONSECUTIVE_FAILURES
                last = self.failed_jobs[-1:] if failed else []
            if count >= n_workers:
                return
            if last:
                raise JobError(
                    f"{MAX_CONSECUTIVE_FAILURES} jobs in a row ended before their "
                    f"workers connected; the last: {last[0].reason}"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"fewer than {n_workers} workers after {timeout} s (jobs: "
                    + ", ".join(f"{j.id} {j.state.value}" for j in self.jobs.values())
                    + ")"
                )
            self._res.stop.wait(0.2)

    def get_client(self) -> Any:
        from zdist.client.client import Client

        return Client(self)

    def close(self, timeout: float | None = 10) -> None:
        """Cancel every job this cluster submitted and stop the broker (if ours).

        Waits up to ``timeout`` seconds for the jobs to leave the queue."""
        if self.status in (Status.closing, Status.closed):
            return
        self.status = Status.closing
        self._adaptive = None
        self._res.stop.set()
        monitor = getattr(self, "_monitor", None)
        if monitor is not None and monitor is not threading.current_thread():
            monitor.join(COMMAND_TIMEOUT)
        with self._res.lock:
            self._cancel(list(self._res.jobs.values()))
            # Jobs cancelled lately may still be listed; the others are known gone.
            recent = time.time() - 600
            ids = [
                j
                for j in self._history
                if j.state is JobState.cancelled and (j.ended_at or 0) > recent
            ]
        deadline = time.monotonic() + (timeout or 0)
        while ids and time.monotonic() < deadline:
            try:
                states = self._queue_states(ids)
            except JobError:
                break
            ids = [j for j in ids if self._classify(states.get(j.number)) is not None]
            if ids:
                time.sleep(0.5)  # polling the batch system, not synchronising
        if ids:
            logger.info(
                "jobs %s still listed after close(); they were cancelled",
                " ".join(j.id for j in ids),
            )
        self._finalizer()
        self.status = Status.closed

    def __enter__(self) -> JobQueueCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        jobs = self.jobs.values()
        pending = sum(j.state is JobState.pending for j in jobs)
        return (
            f"{type(self).__name__}({getattr(self, 'scheduler_address', None)!r}, "
            f"jobs={len(jobs)} ({pending} pending), status={self.status.value})"
        )


def _monitor_loop(ref: weakref.ref[JobQueueCluster], stop: threading.Event) -> None:
    # Holds the cluster only during a step, so an abandoned cluster is collected and
    # its finalizer cancels the jobs.
    while True:
        cluster = ref()
        if cluster is None or stop.is_set():
            return
        tick = cluster._tick()
        try:
            cluster._step()
        except JobError as exc:
            logger.warning("cannot read the queue, will retry: %s", exc)
        except Exception:
            if stop.is_set():
                return
            logger.exception("%s monitor step failed", type(cluster).__name__)
        del cluster
        if stop.wait(tick):
            return
