"""Rows, targets, the Markdown table, the chart and machine info for bench.py.

Everything here works on finished numbers; nothing in this module measures.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MU = "\u00b5"  # micro sign, kept out of the source text for ruff's RUF001


@dataclass(frozen=True)
class RowSpec:
    key: str
    title: str
    unit: str
    higher_is_better: bool


ROWS: dict[str, RowSpec] = {
    r.key: r
    for r in [
        RowSpec("W1", "W1 latency", f"{MU}s per round trip", False),
        RowSpec(
            "W1-secon",
            "W1 latency, security on (paired clusters)",
            f"{MU}s per round trip",
            False,
        ),
        RowSpec(
            "W1-secoff",
            "W1 latency, security off (paired clusters)",
            f"{MU}s per round trip",
            False,
        ),
        RowSpec(
            "W1-tcp-secon",
            "W1 latency over TCP, security on (paired clusters)",
            f"{MU}s per round trip",
            False,
        ),
        RowSpec(
            "W1-tcp-secoff",
            "W1 latency over TCP, security off (paired clusters)",
            f"{MU}s per round trip",
            False,
        ),
        RowSpec(
            "W1-vs-ppe",
            "W1 zdist/ppe, paired samples (context)",
            "x ppe's round trip",
            False,
        ),
        RowSpec(
            "W1-floor",
            "W1 floor: bare pyzmq, client-broker-worker-broker-client, no work",
            f"{MU}s per round trip",
            False,
        ),
        RowSpec(
            "W1-floor-door",
            "W1 floor: client-worker-client on a door's Unix socket, no work",
            f"{MU}s per round trip",
            False,
        ),
        RowSpec("W2", "W2 throughput", "tasks/s", True),
        RowSpec(
            "W2-secon", "W2 throughput, security on (paired clusters)", "tasks/s", True
        ),
        RowSpec(
            "W2-secoff",
            "W2 throughput, security off (paired clusters)",
            "tasks/s",
            True,
        ),
        RowSpec(
            "W2-tcp-secon",
            "W2 throughput over TCP, security on (paired clusters)",
            "tasks/s",
            True,
        ),
        RowSpec(
            "W2-tcp-secoff",
            "W2 throughput over TCP, security off (paired clusters)",
            "tasks/s",
            True,
        ),
        RowSpec("W3", "W3 graph (tree reduction)", "tasks/s", True),
        RowSpec("W4", "W4 chain", f"{MU}s per hop", False),
        RowSpec("W5", "W5 data", "MiB/s", True),
        RowSpec("W5-mem", "W5 peak memory growth", "MiB", False),
        RowSpec(
            "W5-vs-dask",
            "W5 zdist/dask, paired samples (context)",
            "x dask's MiB/s",
            True,
        ),
        RowSpec("W6", "W6 startup + shutdown", "s", False),
        RowSpec("W7", "W7 fan-in", "tasks/s", True),
        RowSpec("W8", "W8 scale, total time", "s", False),
        RowSpec("W8-rate", "W8 scale, throughput", "tasks/s", True),
        RowSpec("W8-mem", "W8 scheduler memory per task", "bytes/task", False),
        RowSpec("W9-idle", "W9 idle broker CPU, many workers", "% of a core", False),
        RowSpec("W9-rate", "W9 dispatch across many workers", "tasks/s", True),
        RowSpec(
            "W9-trip",
            "W9 submit(...).result() among many idle workers",
            f"{MU}s per round trip",
            False,
        ),
        RowSpec("W10", "W10 dask.array (x + x.T).mean()", "s", False),
        RowSpec("SEC-W1", "Security cost on W1", "% slower with security", False),
        RowSpec("SEC-W2", "Security cost on W2", "% slower with security", False),
        RowSpec(
            "SEC-TCP-W1",
            "Security cost on W1 over TCP (CurveZMQ)",
            "% slower with security",
            False,
        ),
        RowSpec(
            "SEC-TCP-W2",
            "Security cost on W2 over TCP (CurveZMQ)",
            "% slower with security",
            False,
        ),
    ]
}


#: Derived rows: how much slower security on is, in percent.
SECURITY_COST = ("SEC-W1", "SEC-W2", "SEC-TCP-W1", "SEC-TCP-W2")

# ------------------------------------------------------------------ the verdicts


def fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    ax = abs(x)
    if ax >= 100:
        return f"{x:,.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def _all_met(clauses: list[bool | None]) -> bool | None:
    if any(c is False for c in clauses):
        return False
    if any(c is None for c in clauses):
        return None
    return True


def target_for(
    row: str, medians: dict[str, dict[str, float]], alive_mib: float
) -> tuple[str, bool | None]:
    """The issue's target for a row and whether this run meets it (None: cannot
    tell, e.g. the other backend was not run)."""
    z = medians.get("zdist", {}).get(row)
    d = medians.get("dask", {}).get(row)
    p = medians.get("ppe", {}).get(row)

    def ratio_at_most(other: float | None, limit: float) -> bool | None:
        return None if z is None or other is None else z <= limit * other

    def ratio_at_least(other: float | None, limit: float) -> bool | None:
        return None if z is None or other is None else z >= limit * other

    if row == "W1":
        return "<= 0.1x dask, <= 1.5x ppe", _all_met(
            [ratio_at_most(d, 0.1), ratio_at_most(p, 1.5)]
        )
    if row == "W5-vs-dask":
        return "(context: the >= 1x dask target, paired)", None
    if row == "W1-vs-ppe":
        # The 1.5x target measured without the drift between backends' runs.
        return "(context: the <= 1.5x ppe target, paired)", None
    if row in ("W1-floor", "W1-floor-door"):
        # Context for W1's ppe target, not a target: what the topology alone costs.
        p1 = medians.get("ppe", {}).get("W1")
        if z is None or p1 is None:
            return "", None
        return f"(context: {z / p1:.2f}x ppe's W1)", None
    if row == "W2":
        return ">= 10x dask, >= 1x ppe, >= 20,000/s", _all_met(
            [
                ratio_at_least(d, 10),
                ratio_at_least(p, 1),
                None if z is None else z >= 20_000,
            ]
        )
    if row in ("W3", "W7"):
        return ">= 10x dask", ratio_at_least(d, 10)
    if row == "W4":
        return "<= 0.1x dask", ratio_at_most(d, 0.1)
    if row == "W5":
        return ">= 1x dask", ratio_at_least(d, 1)
    if row == "W5-mem":
        limit = 1.5 * alive_mib
        return f"<= 1.5x alive ({limit:,.0f} MiB)", None if z is None else z <= limit
    if row == "W6":
        return "<= 1x dask", ratio_at_most(d, 1)
    if row == "W8":
        return "completes", None if z is None else True
    if row == "W8-mem":
        return "<= 1x dask", ratio_at_most(d, 1)
    if row == "W9-idle":
        return "< 10% of a core", None if z is None else z < 10
    if row in SECURITY_COST:
        return "< 10%", None if z is None else z < 10
    return "", None


def build_table(
    results: dict[str, dict[str, Any]], alive_mib: float
) -> list[dict[str, Any]]:
    medians = {b: {r: m.median for r, m in rows.items()} for b, rows in results.items()}
    table = []
    for key, spec in ROWS.items():
        if not any(key in rows for rows in results.values()):
            continue
        z = results.get("zdist", {}).get(key)
        d = medians.get("dask", {}).get(key)
        p = medians.get("ppe", {}).get(key)
        # W8's sizes differ; derived rows are ratios already.
        comparable = (
            key not in ("W8", "W1-vs-ppe", "W5-vs-dask") and key not in SECURITY_COST
        )
        target, met = target_for(key, medians, alive_mib)
        table.append(
            {
                "row": key,
                "workload": spec.title,
                "unit": spec.unit,
                "better": "higher" if spec.higher_is_better else "lower",
                "zdist_median": z.median if z else None,
                "zdist_best": z.best if z else None,
                "dask_median": d,
                "ppe_median": p,
                "zdist_over_dask": z.median / d if z and d and comparable else None,
                "zdist_over_ppe": z.median / p if z and p and comparable else None,
                "target": target,
                "met": met,
            }
        )
    return table


def markdown(
    table: list[dict[str, Any]],
    info: dict[str, Any],
    mode: str,
    errors: dict[str, dict[str, str]],
) -> str:
    arrow = {"higher": "\u2191", "lower": "\u2193"}
    met_text = {True: "yes", False: "**no**", None: "n/a"}
    lines = [
        f"Machine: {info['cpu_model']}, {info['cores_usable']} cores usable, "
        f"Python {info['python']}, {mode} run, {info['timestamp']}",
        "",
        "| workload | unit | zdist median | zdist best | dask median | ppe median "
        "| zdist/dask | zdist/ppe | target | met? |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['workload']} | {r['unit']} ({arrow[r['better']]} better) "
            f"| {fmt(r['zdist_median'])} | {fmt(r['zdist_best'])} "
            f"| {fmt(r['dask_median'])} | {fmt(r['ppe_median'])} "
            f"| {fmt(r['zdist_over_dask'])} | {fmt(r['zdist_over_ppe'])} "
            f"| {r['target']} | {met_text[r['met']] if r['target'] else ''} |"
        )
    lines += [
        "",
        "Ratios are zdist/other on medians. In a \u2191 row (throughput) a ratio "
        "above 1 means zdist is faster; in a \u2193 row (latency, time, memory) a "
        "ratio below 1 means zdist is faster or smaller. W8 runs once, zdist on "
        f"{info['sizes']['w8_tasks_zdist']:,} tasks and dask on "
        f"{info['sizes']['w8_tasks_other']:,}, so its time has no ratio. Security cost "
        "rows compare zdist's security on (its default) with security=False: each "
        "repetition starts one cluster of each, both alive, and every sample runs "
        "on one and then the other; the row is the median of those paired ratios "
        "(this machine's speed drifts by up to 40% over seconds, and both clusters "
        "drift together). Plain rows are LocalCluster's default, where its own "
        "processes reach the broker over a private Unix socket; 'over TCP' rows "
        "use LocalCluster(protocol='tcp'), CurveZMQ on every message, as workers on "
        "other hosts do. The W1 floor rows are scripts/bench_floor.py: client -> "
        "broker -> worker -> broker -> client over bare pyzmq on a Unix socket (as "
        "LocalCluster's default) and no work, in three processes, and client -> "
        "worker -> client over a Unix SOCK_SEQPACKET socket, the path of a lone "
        "task sent through a worker's door (the broker told, off the path); "
        "nothing built on these hops can beat them. W1 zdist/ppe paired is the "
        "median ratio of 10 adjacent W1 samples on a zdist cluster and a "
        "ProcessPoolExecutor alive together; W5 zdist/dask paired likewise, with "
        "a dask cluster. ppe's W4 is sequential submit().result() round trips: a "
        "ProcessPoolExecutor "
        "cannot take a future as an argument.",
    ]
    failed = [(b, w, why) for b, rows in errors.items() for w, why in rows.items()]
    if failed:
        lines += ["", "Failed, so missing from the table:"]
        lines += [f"- {b} {w}: {why}" for b, w, why in failed]
    return "\n".join(lines) + "\n"


def draw_chart(table: list[dict[str, Any]], path: Path, mode: str) -> bool:
    rows = [r for r in table if r["zdist_over_dask"]]
    if not rows:
        print(f"chart: no row has both zdist and dask, {path} not written")
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Every bar reads "how many times better than dask", whichever way the row goes.
    labels, speedups = [], []
    for r in reversed(rows):
        ratio = r["zdist_over_dask"]
        labels.append(r["workload"])
        speedups.append(ratio if r["better"] == "higher" else 1 / ratio)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    colors = ["tab:green" if s >= 1 else "tab:red" for s in speedups]
    # Bars grow from parity (1x): right where zdist wins, left where it loses.
    ax.barh(labels, [x - 1 for x in speedups], left=1, color=colors)
    ax.set_xscale("log")
    # Room on both sides for the value labels, and the 10x line always in view.
    ax.set_xlim(min([*speedups, 1]) / 3, max([*speedups, 10]) * 3)
    ax.axvline(1, color="black", linewidth=1)
    ax.axvline(
        10, color="gray", linestyle="--", linewidth=1, label="10x (target of W1-W4, W7)"
    )
    for y, s in enumerate(speedups):
        ax.annotate(
            f"{s:.3g}x",
            (s, y),
            xytext=(4 if s >= 1 else -4, 0),
            textcoords="offset points",
            ha="left" if s >= 1 else "right",
            va="center",
            fontsize=8,
        )
    ax.set_xlabel(
        "zdist advantage over dask.distributed (x, log scale; >1 = zdist better)"
    )
    ax.set_title(f"zdist vs dask.distributed, 2 workers x 1 thread ({mode} run)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------ environment


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info(sizes: dict[str, int]) -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total_gib = None
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_total_gib = round(int(line.split()[1]) / 2**20, 1)
    packages = {
        name: _package_version(name)
        for name in (
            "zdist",
            "dask",
            "distributed",
            "pyzmq",
            "cloudpickle",
            "msgpack",
            "numpy",
            "tornado",
            "matplotlib",
        )
    }
    if packages["zdist"] is None:
        with contextlib.suppress(Exception):
            import zdist

            packages["zdist"] = getattr(zdist, "__version__", None)
    with contextlib.suppress(Exception):
        import zmq

        packages["libzmq"] = zmq.zmq_version()
    commit = None
    with contextlib.suppress(Exception):
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            or None
        )
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "mem_total_gib": mem_total_gib,
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": packages,
        "git_commit": commit,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "sizes": sizes,
    }
