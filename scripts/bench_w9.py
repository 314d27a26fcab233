"""W9: many workers. One process opens N DEALER sockets that speak the real worker
protocol (register, heartbeat, answer RunTasks with TaskResults) against a real
broker; we measure the broker's CPU share while idle, the time to dispatch tasks, and
sequential submit(...).result() round trips with every worker idle.

    python scripts/bench_w9.py [--workers 1000] [--tasks 100000] [--idle 10]
                                [--trips 300]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import statistics
import sys
import threading
import time
from typing import Any

import zmq

from zdist import Client
from zdist import protocol as P
from zdist._version import versions
from zdist.client.local import BrokerProcess
from zdist.security import Security

NONE_PICKLE = pickle.dumps(None, 5)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class SimulatedWorkers:
    """N worker identities on N DEALER sockets, served by one thread."""

    def __init__(self, address: str, security: Security | None, n: int) -> None:
        self.ctx = zmq.Context()
        self.ctx.max_sockets = n + 64
        self.socks: list[zmq.Socket[Any]] = []
        self.registered = 0
        self.tasks_done = 0
        self.interval = P.HEARTBEAT_INTERVAL
        self._stop = threading.Event()
        for i in range(n):
            s = self.ctx.socket(zmq.DEALER)
            s.linger = 0
            s.identity = f"sim-{i}".encode()
            if security:
                security.configure_client(s)
            s.connect(address)
            self.socks.append(s)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        for i, s in enumerate(self.socks):
            s.send_multipart(
                P.encode(
                    P.RegisterWorker(
                        f"sim-{i}",
                        1,
                        0,
                        {},
                        f"tcp://127.0.0.1:{10000 + i}",
                        "sim",
                        os.getpid(),
                        "/tmp",
                        versions(),  # this environment's: no mismatch warning
                        [],
                    )
                )
            )
        self.thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        for s in self.socks:
            poller.register(s, zmq.POLLIN)
        next_beat = [
            time.monotonic() + self.interval * (i / len(self.socks))
            for i in range(len(self.socks))
        ]
        while not self._stop.is_set():
            for sock, _ in poller.poll(50):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    msg, _payload = P.decode(frames)
                    if isinstance(msg, P.Welcome):
                        self.registered += 1
                        self.interval = msg.heartbeat_interval
                    elif isinstance(msg, P.RunTasks):
                        results, fl = [], P.FrameList()
                        for key, *_ in msg.tasks:
                            ref = fl.add([NONE_PICKLE])
                            results.append(
                                [
                                    key,
                                    "memory",
                                    len(NONE_PICKLE),
                                    "NoneType",
                                    ref,
                                    "",
                                    0.0,
                                ]
                            )
                        sock.send_multipart(P.encode(P.TaskResults(results), fl.frames))
                        self.tasks_done += len(results)
            now = time.monotonic()
            for i, s in enumerate(self.socks):
                if now >= next_beat[i]:
                    s.send_multipart(P.encode(P.Heartbeat({})))
                    next_beat[i] = now + self.interval

    def close(self) -> None:
        self._stop.set()
        self.thread.join(10)
        for s in self.socks:
            s.close(linger=0)
        self.ctx.term()


def run_w9(
    workers: int = 1000,
    tasks: int = 100_000,
    idle: float = 10.0,
    security: bool = True,
    trips: int = 300,
) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = workers * 2 + 256
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    sec = Security.temporary() if security else None
    broker = BrokerProcess(sec, "127.0.0.1", 0, log_level="warning")
    sim = SimulatedWorkers(broker.address, sec, workers)
    try:
        sim.start()
        client = Client(
            broker.address, security=sec or False, set_as_default=False, timeout=120
        )
        t0 = time.monotonic()
        client.wait_for_workers(workers, timeout=300)
        registered_after = time.monotonic() - t0
        time.sleep(2 * sim.interval)  # settle: every worker has heartbeated
        cpu0, t0 = _cpu_seconds(broker.pid), time.monotonic()
        time.sleep(idle)  # the measurement window: idle broker, N workers beating
        idle_share = (_cpu_seconds(broker.pid) - cpu0) / (time.monotonic() - t0)
        t0 = time.monotonic()
        futures = client.map(_noop, range(tasks), pure=False)
        results = client.gather(futures)
        dispatch_s = time.monotonic() - t0
        assert len(results) == tasks and all(r is None for r in results)
        del futures, results
        # Sequential round trips with every worker idle: what one interactive
        # submit(...).result() costs on a broker with this many workers.
        times = []
        cpu0 = _cpu_seconds(broker.pid)
        for i in range(trips):
            t1 = time.perf_counter()
            got = client.submit(_noop, i, pure=False).result()
            times.append(time.perf_counter() - t1)
            assert got is None
        latency_us = statistics.median(times) * 1e6 if times else float("nan")
        trip_cpu_us = (_cpu_seconds(broker.pid) - cpu0) / max(trips, 1) * 1e6
        info = client.scheduler_info()
        client.close()
        return {
            "workers": workers,
            "registered_in_s": registered_after,
            "idle_broker_cpu_share": idle_share,
            "tasks": tasks,
            "dispatch_s": dispatch_s,
            "tasks_per_s": tasks / dispatch_s,
            "round_trips": trips,
            "round_trip_us": latency_us,
            "broker_cpu_per_round_trip_us": trip_cpu_us,
            "sim_tasks_done": sim.tasks_done,
            "workers_seen": len(info["workers"]),
            "security": security,
        }
    finally:
        sim.close()
        broker.close()


def _noop(x: Any) -> None:
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--idle", type=float, default=10.0)
    ap.add_argument("--trips", type=int, default=300)
    ap.add_argument("--no-security", action="store_true")
    args = ap.parse_args()
    out = run_w9(args.workers, args.tasks, args.idle, not args.no_security, args.trips)
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
