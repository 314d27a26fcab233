#!/usr/bin/env python
"""zdist's benchmark against dask.distributed and ProcessPoolExecutor (issue 6).

    python scripts/bench.py                       # full run: zdist, dask, ppe
    python scripts/bench.py --quick               # ~10x smaller, 2 repetitions
    python scripts/bench.py --backends dask,ppe --only W1,W2
    python scripts/bench.py --json r.json --markdown r.md --chart r.png

Every workload is written once, against the dask.distributed Client API
(submit, map, gather, get, Future.result, futures as arguments), and the very same
function measures zdist and dask; ProcessPoolExecutor runs the workloads that need
nothing but submit/result through a thin adapter. Each backend gets 2 workers x 1
thread. Each repetition uses fresh arguments, so `pure=True` never serves a cached
result, and checks its results: a wrong result aborts that workload, it never
becomes a number.

Workloads (sizes for the full run; --quick divides them by ~10):
  W1 latency     300 sequential submit(identity, i).result()        us per round trip
  W2 throughput  map a no-op over 20,000 items, then gather         tasks/s
  W3 graph       binary tree reduction over 4,096 leaves via get   tasks/s
  W4 chain       2,000 tasks, each taking the previous future        us per hop
  W5 data        4 x 64 MiB numpy arrays made on workers, one task
                 sums their lengths                                  MiB/s, peak MiB
  W6 startup     2-worker LocalCluster to first result, then closed  s
  W7 fan-in      one task taking a list of 2,000 futures             tasks/s
  W8 scale       1,000,000-task chunked graph (dask: 100,000), once  s, bytes/task
  W9 many workers 1,000 simulated workers (bench_w9.py): the idle
                 broker's CPU, then 100,000 tasks across them   % of a core, tasks/s
                 then 300 sequential submit().result()          us per round trip
  W10 dask.array (x + x.T).mean() of a 10,000 x 10,000 random array in
                 1,000 x 1,000 chunks, via client.compute            s
Security rows run W1 and W2 on two fresh zdist clusters per repetition, one with
security on and one off, alive together; each of 4 samples runs on one and then the
other, and the cost is the median of those paired ratios. Both at LocalCluster's
default (its processes on the broker's Unix socket) and with protocol="tcp"
(CurveZMQ on every message); every other zdist row runs with security on (its
default). With W1, the W1 floor rows time
2,000 round trips over the same four hops in bare pyzmq, and over the two of a task
sent through a worker's door, a plain Unix socket (bench_floor.py).

Beside it: bench_floor.py (W1's floor), bench_tasks.py (the task functions workers
import), bench_memory.py (process trees and RSS from /proc), bench_report.py
(targets, table, chart).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent


def _make_tasks_importable() -> None:
    """Let this process and every worker process import bench_tasks (and zdist).

    dask's LocalCluster spawns fresh interpreters that do not inherit sys.path, so
    the path must go through PYTHONPATH, before any cluster starts.
    """
    for path in (str(ROOT), str(SCRIPTS)):
        if path not in sys.path:
            sys.path.insert(0, path)
    old = os.environ.get("PYTHONPATH")
    parts = [str(SCRIPTS), str(ROOT)] + ([old] if old else [])
    os.environ["PYTHONPATH"] = os.pathsep.join(parts)


_make_tasks_importable()

import bench_tasks as tasks  # noqa: E402
from bench_floor import floor_round_trip  # noqa: E402
from bench_memory import (  # noqa: E402
    MiB,
    PeakRss,
    process_tree,
    reap_leftovers,
    wait_for_steady_rss,
)
from bench_report import (  # noqa: E402
    ROWS,
    RowSpec,
    build_table,
    draw_chart,
    fmt,
    machine_info,
    markdown,
)

WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8", "W9", "W10")
BACKENDS = ("zdist", "dask", "ppe")
N_WORKERS = 2
THREADS_PER_WORKER = 1


# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    w1_trips: int = 300
    floor_trips: int = 2_000
    w2_items: int = 20_000
    w3_leaves: int = 4_096
    w4_hops: int = 2_000
    w5_array_bytes: int = 64 * MiB
    w5_arrays: int = 4
    w7_fan_in: int = 2_000
    w8_tasks_zdist: int = 1_000_000
    w8_tasks_other: int = 100_000
    w10_side: int = 10_000
    w10_chunk: int = 1_000
    w9_workers: int = 1_000
    w9_tasks: int = 100_000
    w9_idle_s: float = 10.0
    w9_trips: int = 300
    reps: int = 5


FULL = Sizes()
QUICK = Sizes(
    w1_trips=30,
    floor_trips=500,
    w2_items=2_000,
    w3_leaves=512,
    w4_hops=200,
    w5_array_bytes=8 * MiB,
    w7_fan_in=200,
    w8_tasks_zdist=100_000,
    w8_tasks_other=10_000,
    w10_side=3_000,
    w10_chunk=300,
    w9_workers=200,
    w9_tasks=20_000,
    w9_idle_s=3.0,
    w9_trips=100,
    reps=2,
)
# Only for the smoke test (tests/test_bench_smoke.py): checks that every row runs.
TINY = Sizes(
    w1_trips=10,
    floor_trips=50,
    w2_items=200,
    w3_leaves=64,
    w4_hops=20,
    w5_array_bytes=1 * MiB,
    w7_fan_in=50,
    w8_tasks_zdist=2_000,
    w8_tasks_other=1_000,
    w10_side=400,
    w10_chunk=100,
    w9_workers=20,
    w9_tasks=500,
    w9_idle_s=1.0,
    w9_trips=20,
    reps=1,
)


# ------------------------------------------------------------------ measurements


@dataclass
class Measurement:
    """All timed repetitions of one row on one backend (the warm-up is not here)."""

    row: str
    values: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    checked: bool = False

    @property
    def spec(self) -> RowSpec:
        return ROWS[self.row]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def best(self) -> float:
        return max(self.values) if self.spec.higher_is_better else min(self.values)

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.spec.unit,
            "higher_is_better": self.spec.higher_is_better,
            "values": self.values,
            "median": self.median,
            "best": self.best,
            "checked": self.checked,
            "extra": self.extra,
        }


class WrongResult(RuntimeError):
    """A task returned something other than what the workload computed locally."""


def check(got: Any, expected: Any, what: str) -> None:
    # Not `assert`: python -O must not turn the check off.
    if got != expected:
        raise WrongResult(f"{what}: expected {expected!r}, got {got!r}"[:500])


_fresh_bases = itertools.count(1)


def _settle(client: Any, timeout: float = 60) -> None:
    """Wait until the broker holds no task (what a workload released is gone)."""
    deadline = time.monotonic() + timeout
    while client.scheduler_info()["tasks"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster still holds tasks after {timeout} s")
        time.sleep(0.01)  # polling a condition; each look is one round trip


def fresh_base() -> int:
    """A new offset for every repetition, so no task's arguments repeat in a run.

    With pure=True (dask's default, which zdist mirrors) a repeated (func, args)
    would get the same key and could be served from memory without running.
    """
    return next(_fresh_bases) * 10_000_000


# -------------------------------------------------------------------- backends


class Backend:
    """Starts a cluster and hands out a client with the dask.distributed API."""

    name = ""
    has_security = False
    supports_futures_as_args = True

    def cluster(
        self, security: bool = True, protocol: str | None = None
    ) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def scheduler_pid(self, cluster: Any) -> int:
        raise NotImplementedError

    def w8_tasks(self, sizes: Sizes) -> int:
        return sizes.w8_tasks_other


@contextlib.contextmanager
def _open_cluster(
    LocalCluster: Any, Client: Any, **cluster_kwargs: Any
) -> Iterator[tuple[Any, Any]]:
    # Explicit close()s rather than `with`, so a failing Client(...) still closes
    # the cluster and nothing outlives the benchmark.
    cluster = LocalCluster(
        n_workers=N_WORKERS, threads_per_worker=THREADS_PER_WORKER, **cluster_kwargs
    )
    try:
        client = Client(cluster)
        try:
            yield client, cluster
        finally:
            client.close()
    finally:
        cluster.close()


class ZdistBackend(Backend):
    name = "zdist"
    has_security = True

    def cluster(
        self, security: bool = True, protocol: str | None = None
    ) -> contextlib.AbstractContextManager[Any]:
        from zdist import Client, LocalCluster

        return _open_cluster(LocalCluster, Client, security=security, protocol=protocol)

    def scheduler_pid(self, cluster: Any) -> int:
        pid = getattr(cluster, "broker_pid", None)
        if not isinstance(pid, int):
            raise RuntimeError("zdist LocalCluster does not expose broker_pid")
        return pid

    def w8_tasks(self, sizes: Sizes) -> int:
        return sizes.w8_tasks_zdist


class DaskBackend(Backend):
    name = "dask"

    def cluster(
        self, security: bool = True, protocol: str | None = None
    ) -> contextlib.AbstractContextManager[Any]:
        from dask.distributed import Client, LocalCluster

        # dask at its default configuration; only the dashboard is off.
        return _open_cluster(
            LocalCluster, Client, processes=True, dashboard_address=None
        )

    def scheduler_pid(self, cluster: Any) -> int:
        return os.getpid()  # LocalCluster runs dask's scheduler in this process


class ExecutorClient:
    """Just enough of the Client API on a ProcessPoolExecutor for W1, W2 and the
    round-trip form of W4 to run through the same workload functions."""

    def __init__(self, executor: Any) -> None:
        self._executor = executor

    def submit(self, func: Callable[..., Any], *args: Any) -> Any:
        return self._executor.submit(func, *args)

    def map(self, func: Callable[..., Any], iterable: Any) -> list[Any]:
        # One work item per element, like ProcessPoolExecutor.map's chunksize=1.
        return [self._executor.submit(func, x) for x in iterable]

    def gather(self, futures: list[Any]) -> list[Any]:
        return [f.result() for f in futures]


class PpeBackend(Backend):
    name = "ppe"
    supports_futures_as_args = False

    @contextlib.contextmanager
    def cluster(
        self, security: bool = True, protocol: str | None = None
    ) -> Iterator[tuple[Any, Any]]:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: forking a process that has run dask's threads can deadlock, and
        # the start method does not change the steady-state numbers measured here.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(N_WORKERS, mp_context=ctx) as executor:
            yield ExecutorClient(executor), executor


def make_backend(name: str) -> Backend:
    return {"zdist": ZdistBackend, "dask": DaskBackend, "ppe": PpeBackend}[name]()


# ------------------------------------------------------------------- workloads
#
# Each takes a client with the dask API and returns {row: value} for one
# repetition (plus optional extras); the runner repeats them.

Result = dict[str, float]
#: Several values of one row from one repetition (each counts towards the median).
Samples = dict[str, list[float]]
#: Paired W1 samples of zdist and ProcessPoolExecutor (see Runner.w1_against_ppe),
#: and W5 samples of zdist and dask (Runner.w5_against_dask).
PAIRED_W1_SAMPLES = 10
PAIRED_W5_SAMPLES = 10
#: Security rows: paired on/off samples of each workload per repetition (see
#: _security_pair).
SECURITY_SAMPLES = 4
#: The security rows' transports, with their row suffix: LocalCluster's default (its
#: own processes on the broker's Unix socket, checked by the kernel) and TCP, where
#: security is CurveZMQ on every message (what workers on other hosts use).
SECURITY_PROTOCOLS = {None: "", "tcp": "tcp-"}


def w1_latency(client: Any, n: int) -> Result:
    base = fresh_base()
    t0 = time.perf_counter()
    for i in range(n):
        got = client.submit(tasks.identity, base + i).result()
        check(got, base + i, "W1 submit(identity, i).result()")
    return {"W1": (time.perf_counter() - t0) / n * 1e6}


def w2_throughput(client: Any, n: int) -> Result:
    base = fresh_base()
    items = list(range(base, base + n))
    t0 = time.perf_counter()
    futures = client.map(tasks.noop, items)
    got = client.gather(futures)
    elapsed = time.perf_counter() - t0
    check(got, items, "W2 gather(map(noop, items))")
    return {"W2": n / elapsed}


def tree_reduction_graph(prefix: str, leaves: int, base: int) -> tuple[dict, str]:
    """A dask-style dict graph: leaves (identity, x), then pairwise (add, a, b)."""
    dsk: dict[str, tuple] = {}
    level = []
    for i in range(leaves):
        key = f"{prefix}-0-{i}"
        dsk[key] = (tasks.identity, base + i)
        level.append(key)
    depth = 0
    while len(level) > 1:
        depth += 1
        parents = []
        for j in range(0, len(level) - 1, 2):
            key = f"{prefix}-{depth}-{j // 2}"
            dsk[key] = (tasks.add, level[j], level[j + 1])
            parents.append(key)
        if len(level) % 2:
            parents.append(level[-1])
        level = parents
    return dsk, level[0]


def w3_graph(client: Any, leaves: int) -> Result:
    base = fresh_base()
    dsk, root = tree_reduction_graph(f"w3-{base}", leaves, base)
    t0 = time.perf_counter()
    got = client.get(dsk, [root])
    elapsed = time.perf_counter() - t0
    check(list(got), [sum(range(base, base + leaves))], "W3 tree reduction")
    return {"W3": len(dsk) / elapsed}


def w4_chain(client: Any, n: int) -> Result:
    """Each task takes the previous task's future: the broker resolves every hop."""
    base = fresh_base()
    t0 = time.perf_counter()
    future = client.submit(tasks.inc, base)
    for _ in range(n - 1):
        future = client.submit(tasks.inc, future)
    got = future.result()
    elapsed = time.perf_counter() - t0
    check(got, base + n, "W4 chain")
    return {"W4": elapsed / n * 1e6}


def w4_chain_round_trips(client: Any, n: int) -> Result:
    """W4 for executors without futures as arguments: the client carries each hop."""
    base = fresh_base()
    x = base
    t0 = time.perf_counter()
    for _ in range(n):
        x = client.submit(tasks.inc, x).result()
    elapsed = time.perf_counter() - t0
    check(x, base + n, "W4 chain (round trips)")
    return {"W4": elapsed / n * 1e6}


def w5_data(client: Any, array_bytes: int, n_arrays: int) -> Result:
    """Peak memory is summed over the client and the whole cluster (process_tree)."""
    base = fresh_base()
    wait_for_steady_rss(process_tree)
    with PeakRss(process_tree) as memory:
        t0 = time.perf_counter()
        arrays = [
            client.submit(tasks.make_array, array_bytes, base + k)
            for k in range(n_arrays)
        ]
        got = client.submit(tasks.total_len, *arrays).result()
        elapsed = time.perf_counter() - t0
    check(got, n_arrays * array_bytes, "W5 total_len")
    del arrays
    alive = n_arrays * array_bytes
    return {"W5": alive / MiB / elapsed, "W5-mem": memory.growth / MiB}


def w6_startup(backend: Backend) -> tuple[Result, dict[str, float]]:
    base = fresh_base()
    t0 = time.perf_counter()
    with backend.cluster() as (client, _cluster):
        got = client.submit(tasks.inc, base).result()
        first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    check(got, base + 1, "W6 first result")
    return {"W6": total}, {"first_result_s": first, "shutdown_s": total - first}


def w7_fan_in(client: Any, n: int) -> Result:
    base = fresh_base()
    items = list(range(base, base + n))
    t0 = time.perf_counter()
    futures = client.map(tasks.identity, items)
    got = client.submit(tasks.sum_list, futures).result()
    elapsed = time.perf_counter() - t0
    check(got, sum(items), "W7 sum_list(futures)")
    return {"W7": (n + 1) / elapsed}


def chunked_graph(prefix: str, n_tasks: int, base: int) -> tuple[dict, str, int]:
    """About n_tasks tasks: c chunks of (c - 1) independent leaves, each chunk
    reduced by one task, and one final reduction (c = isqrt(n_tasks), so c*c + 1
    tasks: 1,000,001 for a million)."""
    c = max(2, math.isqrt(n_tasks))
    dsk: dict[str, tuple] = {}
    chunk_keys = []
    x = base
    for chunk in range(c):
        leaf_keys = []
        for i in range(c - 1):
            key = f"{prefix}-{chunk}-{i}"
            dsk[key] = (tasks.inc, x)
            leaf_keys.append(key)
            x += 1
        chunk_key = f"{prefix}-sum-{chunk}"
        dsk[chunk_key] = (tasks.sum_args, *leaf_keys)
        chunk_keys.append(chunk_key)
    root = f"{prefix}-total"
    dsk[root] = (tasks.sum_args, *chunk_keys)
    expected = sum(range(base + 1, x + 1))  # every leaf adds one to its x
    return dsk, root, expected


def w8_scale(
    client: Any, cluster: Any, backend: Backend, n_tasks: int
) -> tuple[Result, dict[str, Any]]:
    base = fresh_base()
    t_build = time.perf_counter()
    dsk, root, expected = chunked_graph(f"w8-{base}", n_tasks, base)
    build_s = time.perf_counter() - t_build
    pid = backend.scheduler_pid(cluster)
    gc.collect()
    # Built before the baseline, so the graph the client holds is not counted.
    # For dask the scheduler shares this process with the client, so whatever
    # dask's client keeps for the graph is counted too; it cannot be told apart.
    with PeakRss(lambda: [pid], interval=0.05, refresh=3600) as memory:
        t0 = time.perf_counter()
        got = client.get(dsk, [root])
        elapsed = time.perf_counter() - t0
    check(list(got), [expected], "W8 chunked graph")
    n = len(dsk)
    del dsk
    return (
        {"W8": elapsed, "W8-rate": n / elapsed, "W8-mem": memory.growth / n},
        {
            "tasks": n,
            "graph_build_s": build_s,
            "scheduler_pid_is_client": pid == os.getpid(),
            "scheduler_rss_baseline_mib": memory.baseline / MiB,
            "scheduler_rss_peak_mib": memory.peak / MiB,
        },
    )


def w10_dask_array(client: Any, side: int, chunk: int) -> Result:
    """A dask.array reduction through the client (dask.distributed's
    client.compute): chunks move between the workers for the transpose. Checked
    against 2 * x.mean() computed here with dask's synchronous scheduler."""
    import dask.array as da

    x = da.random.default_rng(fresh_base()).random((side, side), chunks=chunk)
    expected = 2 * float(x.mean().compute(scheduler="sync"))
    t0 = time.perf_counter()
    got = float(client.compute((x + x.T).mean()).result())
    elapsed = time.perf_counter() - t0
    # Summed in another order: equal to about 1e-15, not bit for bit.
    check(round(got / expected, 9), 1.0, "W10 (x + x.T).mean() / (2 * x.mean())")
    return {"W10": elapsed}


def w9_many_workers(sizes: Sizes) -> Result:
    """W9: simulated workers (one process, one DEALER socket each, speaking the real
    worker protocol; see scripts/bench_w9.py) heartbeating at the default interval:
    the broker's CPU share while idle, the time to dispatch tasks across them, then
    sequential round trips with all of them idle."""
    from bench_w9 import run_w9

    out = run_w9(
        sizes.w9_workers, sizes.w9_tasks, idle=sizes.w9_idle_s, trips=sizes.w9_trips
    )
    check(out["workers_seen"], sizes.w9_workers, "W9 workers registered")
    check(out["sim_tasks_done"], sizes.w9_tasks + sizes.w9_trips, "W9 tasks answered")
    return {
        "W9-idle": 100 * out["idle_broker_cpu_share"],
        "W9-rate": out["tasks_per_s"],
        "W9-trip": out["round_trip_us"],
    }


# ----------------------------------------------------------------------- runner


class Runner:
    def __init__(self, sizes: Sizes, reps: int) -> None:
        self.sizes = sizes
        self.reps = reps
        self.results: dict[str, dict[str, Measurement]] = defaultdict(dict)
        self.errors: dict[str, dict[str, str]] = defaultdict(dict)
        self._pairs = 0  # security on/off repetitions run (which goes first)

    def repeat(
        self,
        backend: str,
        label: str,
        one_rep: Callable[[], Result | tuple[Result | Samples, dict[str, Any]]],
        reps: int | None = None,
        warmup: bool = True,
    ) -> None:
        """1 warm-up + reps timed repetitions; the rows are recorded only if every
        repetition ran and checked its result."""
        reps = self.reps if reps is None else reps
        collected: dict[str, Measurement] = {}
        try:
            for rep in range(int(warmup) + reps):
                out = one_rep()
                values, extra = out if isinstance(out, tuple) else (out, {})
                if warmup and rep == 0:
                    continue
                for row, value in values.items():
                    m = collected.setdefault(row, Measurement(row))
                    samples = value if isinstance(value, list) else [value]
                    m.values.extend(float(v) for v in samples)
                    for k, v in extra.items():
                        m.extra.setdefault(k, []).append(v)
        except Exception as exc:
            traceback.print_exc()
            self.errors[backend][label] = f"{type(exc).__name__}: {exc}"[:1000]
            print(f"[{backend}] {label}: FAILED ({type(exc).__name__}: {exc})")
            return
        for row, m in collected.items():
            m.checked = True
            self.results[backend][row] = m
            print(
                f"[{backend}] {m.spec.title}: {fmt(m.median)} {m.spec.unit} "
                f"(median of {len(m.values)}, best {fmt(m.best)})",
                flush=True,
            )

    def run_backend(
        self, backend: Backend, only: set[str], security_rows: bool
    ) -> None:
        name = backend.name
        in_cluster: list[str] = [
            w for w in ("W1", "W2", "W3", "W4", "W5", "W7", "W8", "W10") if w in only
        ]
        if name == "ppe":
            in_cluster = [w for w in in_cluster if w in ("W1", "W2", "W4")]
        if in_cluster:
            self._run_in_cluster_logged(backend, in_cluster)
        if "W6" in only and name != "ppe":
            self.repeat(name, "W6", lambda: w6_startup(backend))
        if security_rows and backend.has_security:
            paired: list[str] = [w for w in ("W1", "W2") if w in only]
            if paired:
                self.repeat(
                    name,
                    "security on/off",
                    partial(self._security_pair, backend, paired),
                    warmup=False,
                )

    def _run_in_cluster_logged(self, backend: Backend, workloads: list[str]) -> None:
        # A cluster that fails to close is an error of the run, but the numbers
        # measured before it still get written.
        try:
            self._run_in_cluster(backend, workloads)
        except Exception as exc:
            traceback.print_exc()
            self.errors[backend.name]["cluster close"] = f"{type(exc).__name__}: {exc}"

    def _run_in_cluster(self, backend: Backend, workloads: list[str]) -> None:
        s = self.sizes
        name = backend.name
        with contextlib.ExitStack() as stack:
            try:
                client, cluster = stack.enter_context(backend.cluster())
            except Exception as exc:
                traceback.print_exc()
                why = f"cluster did not start: {type(exc).__name__}: {exc}"
                for w in workloads:
                    self.errors[name][w] = why
                print(f"[{name}] {why}")
                return
            try:
                self._warm(client)
            except Exception as exc:
                traceback.print_exc()
                for w in workloads:
                    self.errors[name][w] = (
                        f"warm-up failed: {type(exc).__name__}: {exc}"
                    )
                return
            one_rep: dict[str, Callable[[], Any]] = {
                "W1": partial(w1_latency, client, s.w1_trips),
                "W2": partial(w2_throughput, client, s.w2_items),
                "W3": partial(w3_graph, client, s.w3_leaves),
                "W4": partial(
                    w4_chain
                    if backend.supports_futures_as_args
                    else w4_chain_round_trips,
                    client,
                    s.w4_hops,
                ),
                "W5": partial(w5_data, client, s.w5_array_bytes, s.w5_arrays),
                "W7": partial(w7_fan_in, client, s.w7_fan_in),
                "W8": partial(w8_scale, client, cluster, backend, backend.w8_tasks(s)),
                "W10": partial(w10_dask_array, client, s.w10_side, s.w10_chunk),
            }
            for w in workloads:
                if w == "W8":
                    # One repetition, no warm-up: the issue asks for a single run.
                    self.repeat(name, w, one_rep[w], reps=1, warmup=False)
                else:
                    self.repeat(name, w, one_rep[w])

    def _security_pair(
        self, backend: Backend, workloads: list[str]
    ) -> tuple[Samples, dict[str, Any]]:
        """One repetition of the security rows, for each transport: a fresh cluster
        with security on and one with it off, both alive, each sample run on one and
        then the other (alternating which goes first). This VM's speed drifts by up
        to 40% over seconds (other guests), far more than security costs, and both
        clusters drift together: so the cost rows are the median of each adjacent
        on/off sample's ratio, not a ratio of medians (which swung by +-15% on
        clusters that differ in nothing per message). Each cluster runs W2 once
        untimed first (the first W2 on a fresh cluster is its slowest), and every
        sample waits until neither broker holds a task: a W1 run right after the
        other cluster's W2 paid for its 20,000 releases (+60%: on and off then
        measured -26% apart)."""
        self._pairs += 1
        out: Samples = {}
        for protocol, prefix in SECURITY_PROTOCOLS.items():
            with contextlib.ExitStack() as stack:
                clients = {}
                for security in (True, False):
                    cluster = backend.cluster(security=security, protocol=protocol)
                    clients[security], _ = stack.enter_context(cluster)
                for client in clients.values():
                    self._warm(client)
                    if "W2" in workloads:
                        w2_throughput(client, self.sizes.w2_items)
                for w, i in itertools.product(workloads, range(SECURITY_SAMPLES)):
                    order = (True, False) if (self._pairs + i) % 2 else (False, True)
                    got = {}
                    for security in order:
                        # The other cluster's last W2 may still be releasing
                        # 20,000 tasks: that would land on this sample.
                        for client in clients.values():
                            _settle(client)
                        if w == "W1":
                            got[security] = w1_latency(
                                clients[security], self.sizes.w1_trips
                            )["W1"]
                        else:
                            got[security] = w2_throughput(
                                clients[security], self.sizes.w2_items
                            )["W2"]
                        suffix = prefix + ("secon" if security else "secoff")
                        out.setdefault(f"{w}-{suffix}", []).append(got[security])
                    # "% slower with security": W1 is a time, W2 a rate.
                    slow, fast = (True, False) if w == "W1" else (False, True)
                    cost = (got[slow] / got[fast] - 1) * 100
                    out.setdefault(f"SEC-{prefix.upper()}{w}", []).append(cost)
        return out, {}

    def w1_against_ppe(self) -> tuple[Samples, dict[str, Any]]:
        """W1 on a zdist cluster and on a ProcessPoolExecutor, both alive, each sample
        on one and then the other (alternating which goes first): zdist/ppe per
        adjacent pair. The W1 row's ratio compares medians taken minutes apart, and
        this machine's speed drifts by up to 40% within seconds; this one does not."""
        out: Samples = {}
        with contextlib.ExitStack() as stack:
            zdist, _ = stack.enter_context(ZdistBackend().cluster())
            ppe, _ = stack.enter_context(PpeBackend().cluster())
            for client in (zdist, ppe):
                w1_latency(client, self.sizes.w1_trips)  # warm
            for i in range(PAIRED_W1_SAMPLES):
                got = {}
                for name in ("zdist", "ppe") if i % 2 else ("ppe", "zdist"):
                    client = zdist if name == "zdist" else ppe
                    got[name] = w1_latency(client, self.sizes.w1_trips)["W1"]
                out.setdefault("W1-vs-ppe", []).append(got["zdist"] / got["ppe"])
        return out, {}

    def w5_against_dask(self) -> tuple[Samples, dict[str, Any]]:
        """W5 on a zdist cluster and a dask one, both alive, each sample on one and
        then the other (alternating which goes first): zdist/dask MiB/s per adjacent
        pair. W5 is mostly first-touch page faults, which this VM serves at rates
        that vary 5x between repetitions; this pairs them in time."""
        out: Samples = {}
        s = self.sizes
        with contextlib.ExitStack() as stack:
            # dask's first: its nannies pickle dask's config for their processes,
            # where a zdist Client set as the default scheduler cannot go.
            clients = {"dask": stack.enter_context(DaskBackend().cluster())[0]}
            clients["zdist"] = stack.enter_context(ZdistBackend().cluster())[0]
            for client in clients.values():
                w5_data(client, s.w5_array_bytes, s.w5_arrays)  # warm
            for i in range(PAIRED_W5_SAMPLES):
                got = {}
                for name in ("zdist", "dask") if i % 2 else ("dask", "zdist"):
                    got[name] = w5_data(clients[name], s.w5_array_bytes, s.w5_arrays)[
                        "W5"
                    ]
                out.setdefault("W5-vs-dask", []).append(got["zdist"] / got["dask"])
        return out, {}

    @staticmethod
    def _warm(client: Any) -> None:
        """A few tasks before anything is timed, so imports and connections are done
        even for a workload run alone (each workload still has its own warm-up)."""
        base = fresh_base()
        items = list(range(base, base + 4 * N_WORKERS))
        check(client.gather(client.map(tasks.identity, items)), items, "warm-up")


# ------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Benchmark zdist against dask.distributed and ProcessPoolExecutor.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    ap.add_argument("--quick", action="store_true", help="sizes ~10x smaller, 2 reps")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, help="timed repetitions (default 5, quick 2)")
    ap.add_argument(
        "--backends", default=",".join(BACKENDS), help="comma list of zdist,dask,ppe"
    )
    ap.add_argument("--only", help="comma list of workloads, e.g. W1,W2 (default all)")
    ap.add_argument(
        "--json",
        type=Path,
        default=ROOT / "bench-results" / "results.json",
        help="raw results (default bench-results/results.json)",
    )
    ap.add_argument("--markdown", type=Path, help="also write the table here")
    ap.add_argument("--chart", type=Path, help="PNG: zdist vs dask per workload")
    ap.add_argument(
        "--no-security-rows",
        action="store_true",
        help="skip the security cost rows (W1 and W2 on fresh clusters, on and off)",
    )
    args = ap.parse_args(argv)
    args.tiny = args.tiny or os.environ.get("ZDIST_BENCH_TINY") == "1"
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    only = [w.strip().upper() for w in (args.only or ",".join(WORKLOADS)).split(",")]
    for b in backends:
        if b not in BACKENDS:
            ap.error(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    for w in only:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    if args.reps is not None and args.reps < 1:
        ap.error("--reps must be at least 1")
    args.backend_list, args.only_set = backends, set(only)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = TINY if args.tiny else QUICK if args.quick else FULL
    reps = args.reps if args.reps is not None else sizes.reps
    sizes = replace(sizes, reps=reps)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    info = machine_info(sizes.__dict__)
    print(
        f"zdist benchmark ({mode}): {', '.join(args.backend_list)}; "
        f"{N_WORKERS} workers x {THREADS_PER_WORKER} thread; 1 warm-up + {reps} reps; "
        f"load average at start {info['loadavg_at_start'][0]:.2f}",
        flush=True,
    )

    runner = Runner(sizes, reps)
    not_implemented: list[str] = []
    for name in args.backend_list:
        runner.run_backend(
            make_backend(name), args.only_set, security_rows=not args.no_security_rows
        )
    if "W1" in args.only_set and "zdist" in args.backend_list:
        # One repetition of many round trips (its own median), no warm-up.
        runner.repeat(
            "zdist",
            "W1-floor",
            lambda: {"W1-floor": floor_round_trip(sizes.floor_trips)},
            reps=1,
            warmup=False,
        )
        runner.repeat(
            "zdist",
            "W1-floor-door",
            lambda: {"W1-floor-door": floor_round_trip(sizes.floor_trips, hops=2)},
            reps=1,
            warmup=False,
        )
    if "W1" in args.only_set and {"zdist", "ppe"} <= set(args.backend_list):
        runner.repeat(
            "zdist", "W1 vs ppe, paired", runner.w1_against_ppe, reps=1, warmup=False
        )
    if "W5" in args.only_set and {"zdist", "dask"} <= set(args.backend_list):
        runner.repeat(
            "zdist", "W5 vs dask, paired", runner.w5_against_dask, reps=1, warmup=False
        )
    if "W9" in args.only_set and "zdist" in args.backend_list:
        # One repetition, no warm-up: it starts its own broker and 1,000 sockets.
        runner.repeat(
            "zdist", "W9", lambda: w9_many_workers(sizes), reps=1, warmup=False
        )
    leftovers = reap_leftovers()

    alive_mib = sizes.w5_arrays * sizes.w5_array_bytes / MiB
    table = build_table(runner.results, alive_mib)
    md = markdown(table, info, mode, runner.errors)
    print()
    print(md)
    doc = {
        "mode": mode,
        "reps": reps,
        "warmups": 1,
        "backends": args.backend_list,
        "workloads": sorted(args.only_set),
        "machine": info,
        "results": {
            b: {r: m.to_json() for r, m in rows.items()}
            for b, rows in runner.results.items()
        },
        "table": table,
        "errors": runner.errors,
        "not_implemented": not_implemented,
        "leftover_processes": leftovers,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(md)
        print(f"wrote {args.markdown}")
    if args.chart and draw_chart(table, args.chart, mode):
        print(f"wrote {args.chart}")
    if runner.errors:
        print(f"errors: {json.dumps(runner.errors, indent=2)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
