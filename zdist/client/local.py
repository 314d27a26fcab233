"""LocalCluster: a real broker and real workers on this machine.

With ``processes=True`` (the default) the broker is a child ``zbroker`` process and each
worker a child ``zworker`` (the same code the command runs). Keys reach them on stdin,
never argv; stdin stays open as a lifeline, so every child exits when this process dies,
even by SIGKILL, and no orphan survives a killed notebook. ``processes=False`` runs the
broker and workers as threads of this process.

Broker and workers start together: each ``zworker`` gets ADDRESS ``-`` and reads the
broker's address on stdin once the broker reports it, so the interpreter starts and
imports (most of a cluster's start-up time) overlap.
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
import uuid
import weakref
from typing import Any

from zdist.client.jobscript import nprocesses_nthreads
from zdist.errors import ZdistError
from zdist.localsocket import remove_socket, user_socket_dir
from zdist.security import Security
from zdist.worker.nanny import worker_environment

logger = logging.getLogger(__name__)


class BrokerProcess:
    """A ``zbroker`` child process; ``address`` once it listens."""

    def __init__(
        self,
        security: Security | None,
        host: str = "127.0.0.1",
        port: int = 0,
        interface: str | None = None,
        scheduler_file: str | None = None,
        extra_args: tuple[str, ...] = (),
        log_level: str = "warning",
        timeout: float = 30,
        dashboard_address: str | None = None,
        wait: bool = True,
        local_socket: str | None = None,
    ) -> None:
        """Start ``zbroker``; with ``wait=False`` return at once and let the caller
        call :meth:`wait_ready` (meanwhile ``address`` is empty). ``local_socket``: a
        path for its Unix socket (``local_address``) too."""
        self.dashboard_link: str | None = None
        self.local_address: str | None = None
        self.address = ""
        args = [
            sys.executable,
            "-m",
            "zdist.broker",
            "--host",
            host,
            "--port",
            str(port),
            "--lifeline",
            "--log-level",
            log_level,
            *extra_args,
        ]
        if interface:
            args += ["--interface", interface]
        if scheduler_file:
            args += ["--scheduler-file", scheduler_file]
        args += ["--security-file", "-"] if security else ["--no-security"]
        args += ["--dashboard-address", dashboard_address or "none"]
        if local_socket:
            args += ["--local-socket", local_socket]
        # The lines it prints once it listens, in this order.
        self._expect = ["listening at "]
        if local_socket:
            self._expect.append("local socket at ")
        if dashboard_address:
            self._expect.append("dashboard at ")
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if security:
            self.proc.stdin.write(json.dumps(security.to_dict()).encode() + b"\n")
            self.proc.stdin.flush()
        self.pid = self.proc.pid
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30) -> str:
        """The broker's address, once it listens; ZdistError if it does not start."""
        if not self.address:
            self.address = self._read_address(timeout)
        return self.address

    def _read_address(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        result: list[str] = []

        def read() -> None:
            # The broker prints its address, then its local socket and dashboard link
            # (if it has them).
            for raw in iter(stdout.readline, b""):
                line = raw.decode()
                result.append(line)
                if self._expect[-1] in line:
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        for line in result:
            if "dashboard at " in line:
                self.dashboard_link = line.split("dashboard at ", 1)[1].strip()
            if "local socket at " in line:
                self.local_address = line.split("local socket at ", 1)[1].strip()
        line = result[0] if result else ""
        if "listening at " not in line:
            self.close()
            raise ZdistError(
                f"zbroker did not start (exit code {self.proc.returncode}); "
                f"see its messages above"
            )
        return line.split("listening at ", 1)[1].strip()

    def close(self, timeout: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


class WorkerProcess:
    """A ``zworker`` child (a supervisor with one worker process under it).

    ``address=None`` starts it before the broker has one: it imports and waits, and
    :meth:`connect` hands it the address."""

    def __init__(
        self,
        address: str | None,
        security: Security | None,
        name: str,
        nthreads: int,
        memory_limit: str | int,
        resources: dict[str, float] | None = None,
        local_directory: str | None = None,
        log_level: str = "warning",
        nanny: bool = True,
    ) -> None:
        args = [
            sys.executable,
            "-m",
            "zdist.worker",
            address or "-",
            "--name",
            name,
            "--nthreads",
            str(nthreads),
            "--memory-limit",
            str(memory_limit),
            "--lifeline",
            "--log-level",
            log_level,
            "--nanny" if nanny else "--no-nanny",
        ]
        if resources:
            args += ["--resources", " ".join(f"{k}={v}" for k, v in resources.items())]
        if local_directory:
            args += ["--local-directory", local_directory]
        args += ["--security-file", "-"] if security else ["--no-security"]
        self.name = name
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, env=worker_environment()
        )
        assert self.proc.stdin is not None
        if security:
            self.proc.stdin.write(json.dumps(security.to_dict()).encode() + b"\n")
            self.proc.stdin.flush()

    def connect(self, address: str) -> None:
        """Tell a worker started with ``address=None`` where the broker is."""
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.write(address.encode() + b"\n")
                self.proc.stdin.flush()
            except OSError:  # it died; the wait for workers reports that
                pass

    def terminate(self) -> None:
        """Graceful: the worker hands queued work back and finishes running tasks."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Immediate: closing the lifeline makes the supervisor stop its worker now."""
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def wait(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass


class _ThreadedWorker:
    def __init__(
        self,
        address: str,
        security: Security | None,
        name: str,
        nthreads: int,
        memory_limit: int,
        resources: dict[str, float] | None,
        local_directory: str | None,
    ) -> None:
        from zdist.worker.worker import Worker, WorkerConfig

        self.name = name
        self.worker = Worker(
            WorkerConfig(
                address=address,
                security=security,
                name=name,
                nthreads=nthreads,
                memory_limit=memory_limit,
                resources=dict(resources or {}),
                local_directory=local_directory or "",
            )
        )
        self.thread = threading.Thread(target=self.worker.run, name=name, daemon=True)
        self.thread.start()

    def terminate(self) -> None:
        self.worker.close_gracefully("scaled down")

    def kill(self) -> None:
        self.worker.stop()

    def wait(self, timeout: float) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.worker.stop()
            self.thread.join(timeout)


class LocalCluster:
    """dask.distributed's LocalCluster on zdist (same arguments and defaults)."""

    def __init__(
        self,
        n_workers: int | None = None,
        threads_per_worker: int | None = None,
        processes: bool = True,
        memory_limit: str | int = "auto",
        host: str | None = "127.0.0.1",
        scheduler_port: int = 0,
        security: Security | bool | None = True,
        resources: dict[str, float] | None = None,
        local_directory: str | None = None,
        dashboard_address: str | None = ":8787",
        silence_logs: int | bool = logging.WARNING,
        name: str | None = None,
        nanny: bool = True,
        timeout: float = 30,
        **kwargs: Any,
    ) -> None:
        unknown = set(kwargs) - {
            "worker_class",
            "asynchronous",
            "loop",
            "interface",
            "protocol",
            "worker_dashboard_address",
            "diagnostics_port",
            "services",
            "service_kwargs",
            "scheduler_kwargs",
            "worker_kwargs",
            "blocked_handlers",
            "deploy_mode",
            "shutdown_on_close",
            "lifetime",
            "lifetime_stagger",
        }
        if unknown:
            raise TypeError(f"LocalCluster got unexpected arguments: {sorted(unknown)}")
        use_ipc = _use_local_socket(kwargs.get("protocol"), processes, host)
        cores = os.cpu_count() or 1
        if n_workers is None and threads_per_worker is None:
            if processes:
                n_workers, threads_per_worker = nprocesses_nthreads(cores)
            else:
                n_workers, threads_per_worker = 1, cores
        elif n_workers is None:
            n_workers = max(1, cores // max(1, threads_per_worker or 1))
        elif threads_per_worker is None:
            threads_per_worker = max(1, cores // max(1, n_workers))
        self.threads_per_worker = threads_per_worker
        self.processes = processes
        self.memory_limit = memory_limit
        self.resources = resources
        self.local_directory = local_directory
        self.nanny = nanny
        self.name = name or "LocalCluster"
        self.timeout = timeout
        self._log_level = "warning" if silence_logs else "info"
        if security is True or security is None:
            self.security: Security | None = Security.temporary()
        elif security is False:
            self.security = None
            logger.warning(
                "LocalCluster without security: anyone on this machine can "
                "submit code to it"
            )
        else:
            self.security = security
        self.workers: dict[str, Any] = {}
        self._counter = 0
        self._broker_thread: threading.Thread | None = None
        self._broker_proc: BrokerProcess | None = None
        self._closed = False
        self._client: Any = None
        self.dashboard_link: str | None = None
        self.scheduler_address = ""
        #: Where this cluster's own workers and ``Client(cluster)`` connect: the
        #: broker's Unix socket (zdist.security.bind_local_socket), else None and
        #: they use ``scheduler_address``.
        self.local_address: str | None = None
        socket_dir = user_socket_dir() if use_ipc else None
        if use_ipc and socket_dir is None:
            if str(kwargs.get("protocol")).startswith("ipc"):
                raise ZdistError("LocalCluster(protocol='ipc'): no safe directory")
            logger.info("no safe directory for a local socket: the cluster uses TCP")
        self._socket = socket_dir and os.path.join(
            socket_dir, f"{uuid.uuid4().hex}.sock"
        )
        if processes:
            self._broker_proc = BrokerProcess(
                self.security,
                host or "127.0.0.1",
                scheduler_port,
                log_level=self._log_level,
                dashboard_address=dashboard_address,
                wait=False,
                local_socket=self._socket,
            )
            self.broker_pid = self._broker_proc.pid
        else:
            from zdist.broker.server import BrokerServer, ServerConfig

            self._server = BrokerServer(
                ServerConfig(
                    host=host or "127.0.0.1",
                    port=scheduler_port,
                    dashboard_address=dashboard_address,
                ),
                self.security,
            )
            if self._server.dashboard is not None:
                self.dashboard_link = self._server.dashboard.link
            self.scheduler_address = self._server.address
            self.broker_pid = os.getpid()
            self._broker_thread = threading.Thread(
                target=self._server.serve_forever, name="zdist-broker", daemon=True
            )
            self._broker_thread.start()
        self._finalizer = weakref.finalize(
            self,
            _shutdown,
            self.workers,
            self._broker_proc,
            self._broker_thread and self._server,
            self._socket,
        )
        try:
            # Workers first: they start with no address and wait for it on stdin, so
            # their start overlaps the broker's.
            self.scale(n_workers)
            if self._broker_proc is not None:
                self.scheduler_address = self._broker_proc.wait_ready(timeout)
                self.dashboard_link = self._broker_proc.dashboard_link
                self.local_address = self._broker_proc.local_address
                for w in self.workers.values():
                    w.connect(self.local_address or self.scheduler_address)
            self._wait_for_workers(n_workers, timeout)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------------------------

    def _control(self) -> Any:
        if self._client is None:
            from zdist.client.client import Client

            self._client = Client(
                self.local_address or self.scheduler_address,
                security=self.security or False,
                set_as_default=False,
                timeout=self.timeout,
            )
        return self._client

    def _wait_for_workers(self, n: int, timeout: float) -> None:
        if not n:
            return
        client = self._control()
        deadline = time.monotonic() + timeout
        # A short fixed interval: workers register within milliseconds of the broker's
        # start, and Client.wait_for_workers' backoff (up to 0.2 s between looks) would
        # add up to that much to every cluster start. A look is one small round trip.
        while len(client.scheduler_info()["workers"]) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {n} workers after {timeout} s")
            time.sleep(0.005)

    def _start_worker(self) -> None:
        name = f"{self._counter}"
        self._counter += 1
        if self.processes:
            self.workers[name] = WorkerProcess(
                self.local_address or self.scheduler_address or None,
                self.security,
                name,
                self.threads_per_worker or 1,
                self.memory_limit if self.memory_limit is not None else 0,
                self.resources,
                self.local_directory,
                self._log_level,
                self.nanny,
            )
        else:
            from zdist.worker.cli import resolve_memory_limit

            limit = (
                self.memory_limit
                if isinstance(self.memory_limit, int)
                else resolve_memory_limit(str(self.memory_limit), 1)
            )
            self.workers[name] = _ThreadedWorker(
                self.scheduler_address,
                self.security,
                name,
                self.threads_per_worker or 1,
                limit,
                self.resources,
                self.local_directory,
            )

    def scale(
        self, n: int | None = None, memory: Any = None, cores: Any = None
    ) -> None:
        """Have ``n`` workers: start new ones or stop the newest (gracefully)."""
        if n is None:
            raise ValueError("scale() needs the number of workers")
        while len(self.workers) < n:
            self._start_worker()
        stopping = []
        while len(self.workers) > n:
            name = list(self.workers)[-1]
            w = self.workers.pop(name)
            w.terminate()
            stopping.append(w)
        for w in stopping:
            w.wait(30)

    def wait_for_workers(self, n_workers: int, timeout: float | None = None) -> None:
        self._control().wait_for_workers(n_workers, timeout)

    def get_client(self) -> Any:
        from zdist.client.client import Client

        return Client(self)

    def close(self, timeout: float | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._client is not None:
            self._client.close()
            self._client = None
        self._finalizer()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"LocalCluster({self.scheduler_address!r}, workers={len(self.workers)}, "
            f"threads={len(self.workers) * (self.threads_per_worker or 1)})"
        )


def _use_local_socket(protocol: Any, processes: bool, host: str | None) -> bool:
    """Whether a cluster's own processes talk over a Unix socket: by default with
    processes on a loopback host (dask's ``protocol=`` picks the transport; "tcp"
    keeps everything on TCP with CurveZMQ). Another host means that other machines
    are to reach the cluster, workers' data ports included: TCP then."""
    name = (protocol or "").rstrip(":/")
    if name not in ("", "tcp", "ipc", "inproc"):
        raise ValueError(
            f"LocalCluster(protocol={protocol!r}): zdist supports 'tcp' and 'ipc' "
            f"(and 'inproc' with processes=False)"
        )
    if name == "inproc" and processes:
        raise ValueError("LocalCluster(protocol='inproc') needs processes=False")
    if name == "ipc" and not processes:
        raise ValueError("LocalCluster(protocol='ipc') needs processes=True")
    loopback = host in (None, "", "localhost", "::1") or host.startswith("127.")
    return processes and (name == "ipc" or (name == "" and loopback))


def _shutdown(
    workers: dict[str, Any],
    broker: BrokerProcess | None,
    server: Any,
    local_socket: str | None = None,
) -> None:
    ws = list(workers.values())
    workers.clear()
    # Everything stops at once, then we wait: each process takes ~0.1 s to exit.
    for w in ws:
        w.kill()
    if broker is not None and broker.proc.poll() is None:
        broker.proc.send_signal(signal.SIGTERM)
    for w in ws:
        w.wait(10)
    if broker is not None:
        broker.close()
    if server:
        server.stop()
    if local_socket:  # the broker removes it, unless it died first
        remove_socket(f"ipc://{local_socket}")
