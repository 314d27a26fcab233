"""``zdist``: admin commands for a running broker (``zdist status``).

The view is the broker's ``status`` snapshot, the same data the dashboard draws, read
through an ordinary client: a terminal over ssh sees what a browser would.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

import click

from zdist._version import __version__

#: Task states in the order work moves through them.
STATES = ("released", "waiting", "ready", "processing", "memory", "erred")
#: Task groups and errors the table shows (``--json`` has them all).
TABLE_GROUPS = 15
TABLE_ERRORS = 5


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zdist")
def main() -> None:
    """Admin commands for a zdist cluster."""


@main.command()
@click.option(
    "--scheduler-file",
    required=True,
    type=click.Path(dir_okay=False),
    help="The broker's scheduler file (zbroker --scheduler-file).",
)
@click.option(
    "--watch",
    is_flag=False,
    flag_value=2.0,
    default=None,
    type=click.FloatRange(min=0.1),
    metavar="[SECONDS]",
    help="Refresh every SECONDS (default 2) until Ctrl-C.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (a line per refresh)."
)
@click.option(
    "--timeout",
    default=10.0,
    show_default=True,
    type=float,
    help="Seconds to wait for the broker.",
)
def status(
    scheduler_file: str, watch: float | None, as_json: bool, timeout: float
) -> None:
    """Workers, tasks by state and task groups of a running broker."""
    logging.basicConfig(level=logging.WARNING, format="zdist: %(message)s")
    if not os.path.exists(scheduler_file):
        raise click.ClickException(
            f"no scheduler file at {scheduler_file}: is the broker running? "
            f"(start it with: zbroker --scheduler-file {scheduler_file})"
        )
    from zdist.client.client import Client

    try:
        client = Client(
            scheduler_file=scheduler_file,
            set_as_default=False,
            timeout=timeout,
            name="zdist-status",
        )
    except Exception as exc:
        raise click.ClickException(
            f"cannot reach the broker of {scheduler_file}: {type(exc).__name__}: {exc}"
        ) from None
    try:
        while True:
            try:
                view = summarise(client._info("status"))
            except Exception as exc:
                raise click.ClickException(
                    f"lost the broker: {type(exc).__name__}: {exc}"
                ) from None
            if as_json:
                click.echo(json.dumps(view))
            else:
                if watch is not None:
                    click.clear()
                click.echo(render(view), nl=False)
            if watch is None:
                return
            sys.stdout.flush()
            time.sleep(watch)  # the refresh period the user asked for
    except KeyboardInterrupt:
        return
    finally:
        client.close()


def summarise(info: dict[str, Any]) -> dict[str, Any]:
    """The broker's status snapshot -> what ``zdist status`` shows (and ``--json``)."""
    now = info.get("now")  # broker monotonic clock, the one ``last_seen`` is on
    wall = info.get("time")
    workers = []
    for address, w in sorted(
        info.get("workers", {}).items(), key=lambda aw: str(aw[1].get("name"))
    ):
        metrics = w.get("metrics") or {}
        processing = int(w.get("processing", 0))
        executing = metrics.get("executing")
        if now is not None and w.get("last_seen") is not None:
            age: float | None = max(0.0, now - w["last_seen"])
        elif wall is not None and metrics.get("time") is not None:
            age = max(0.0, wall - metrics["time"])  # the last heartbeat's metrics
        else:
            age = None
        workers.append(
            {
                "address": address,
                "name": str(w.get("name", address)),
                "host": w.get("host", ""),
                "nthreads": w.get("nthreads", 0),
                "memory": metrics.get("memory"),
                "memory_limit": w.get("memory_limit") or None,
                "running": executing if executing is not None else None,
                "queued": (
                    max(0, processing - executing) if executing is not None else None
                ),
                "processing": processing,
                "in_memory": w.get("in_memory", 0),
                "spilled": metrics.get("spilled", 0),
                "status": w.get("status", ""),
                "heartbeat_age": age,
            }
        )
    tasks = {s: 0 for s in STATES}
    tasks.update(info.get("tasks", {}))
    return {
        "address": info.get("address"),
        "dashboard": info.get("dashboard") or None,
        "time": wall,
        "n_clients": info.get("n_clients"),
        "workers": workers,
        "tasks": tasks,
        "groups": info.get("groups", []),
        "counters": info.get("counters", {}),
        "errors": info.get("errors", []),
    }


def render(view: dict[str, Any]) -> str:
    """The plain-text tables of ``zdist status``."""
    workers = view["workers"]
    threads = sum(w["nthreads"] for w in workers)
    lines = [
        f"broker {view['address']} | workers {len(workers)} | threads {threads} "
        f"| clients {view.get('n_clients') or 0}"
    ]
    if view.get("time"):
        lines[0] += time.strftime(" | %Y-%m-%d %H:%M:%S", time.localtime(view["time"]))
    if view.get("dashboard"):
        lines.append(f"dashboard: {view['dashboard']}")
    lines.append("")
    rows = [
        [
            w["name"],
            w["host"],
            str(w["nthreads"]),
            f"{_bytes(w['memory'])} / {_bytes(w['memory_limit'])}",
            _count(w["running"]),
            _count(w["queued"]),
            str(w["in_memory"]),
            str(w["spilled"]),
            w["status"],
            "-" if w["heartbeat_age"] is None else f"{w['heartbeat_age']:.1f}s ago",
        ]
        for w in workers
    ]
    head = [
        "WORKER",
        "HOST",
        "THREADS",
        "MEMORY USED / LIMIT",
        "RUNNING",
        "QUEUED",
        "IN MEMORY",
        "SPILLED",
        "STATUS",
        "HEARTBEAT",
    ]
    lines += _table(head, rows) if rows else ["(no workers)"]
    lines.append("")
    tasks = view["tasks"]
    lines += _table(["TASKS", *tasks], [["count", *map(str, tasks.values())]])
    groups = view["groups"][-TABLE_GROUPS:]
    if groups:
        lines.append("")
        lines += _table(
            ["GROUP", "DONE", "ERRED", "TOTAL", "PROGRESS"],
            [
                [
                    g["name"],
                    str(g["done"]),
                    str(g["erred"]),
                    str(g["total"]),
                    _bar(g["done"] + g["erred"], g["total"]),
                ]
                for g in groups
            ],
        )
    errors = view["errors"][-TABLE_ERRORS:]
    if errors:
        lines += ["", "RECENT ERRORS"]
        for e in errors:
            first = (e.get("text") or "").strip().splitlines()[:1]
            lines.append(f"  {e['key']} on {e['worker']}: {''.join(first)}")
    return "\n".join(lines) + "\n"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return [
        "  ".join(str(c).ljust(wd) for c, wd in zip(r, widths, strict=True)).rstrip()
        for r in [head, *rows]
    ]


def _bar(done: int, total: int, width: int = 20) -> str:
    frac = done / total if total else 1.0
    filled = round(frac * width)
    return "#" * filled + "." * (width - filled) + f" {frac:4.0%}"


def _count(n: int | None) -> str:
    return "-" if n is None else str(n)


def _bytes(n: float | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
