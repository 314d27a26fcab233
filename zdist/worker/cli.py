"""``zworker``: start workers for a broker (supervised, restarted on crash)."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
from typing import Any

import click

from zdist._gc import tune_for_service
from zdist._lifeline import exit_now, watch_stdin
from zdist._version import __version__
from zdist.errors import SecurityError, ZdistError
from zdist.localsocket import check_local_socket
from zdist.net import interface_ip, is_ipc, split_address
from zdist.security import Security, read_security_stream, wait_for_scheduler_file
from zdist.units import parse_memory
from zdist.worker.nanny import Nanny
from zdist.worker.worker import Worker, WorkerConfig

logger = logging.getLogger("zdist.worker")


def parse_bytes(text: str | int | float) -> int:
    """dask's units: ``"4GB"`` = 4e9, ``"4GiB"`` = 4 * 2**30, plain numbers: bytes."""
    if isinstance(text, float):
        text = repr(text)
    try:
        return parse_memory(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def resolve_memory_limit(text: str, nworkers: int) -> int:
    """``auto`` shares the machine's memory between the workers, as dask does."""
    if text in ("auto", "", None):
        return total_memory() // max(1, nworkers)
    if text in ("0", "none", "None"):
        return 0
    if re.fullmatch(r"0?\.[0-9]+|1(\.0)?", text):
        return int(float(text) * total_memory())
    return parse_bytes(text)


def detect_gpus() -> list[str]:
    """Visible GPUs: CUDA_VISIBLE_DEVICES if set, else those ``nvidia-smi -L`` lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [
            d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"
        ]
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [m.group(1) for m in re.finditer(r"^GPU (\d+):", out, re.M)]


def parse_resources(text: str | None) -> dict[str, Any]:
    """``"GPU=2 MEM=10e9"`` -> ``{"GPU": 2.0, "MEM": 1e10}`` (dask's syntax);
    ``GPU=auto`` stays ``"auto"`` (one worker per visible GPU)."""
    out: dict[str, Any] = {}
    for item in (text or "").replace(",", " ").split():
        name, sep, value = item.partition("=")
        if name == "GPU" and value == "auto":
            out[name] = "auto"
            continue
        try:
            out[name] = float(value)
        except ValueError:
            raise click.BadParameter(
                f"{item!r}: resources look like 'GPU=2 MEM=10e9'"
            ) from None
        if not sep or not name:
            raise click.BadParameter(f"{item!r}: resources look like 'GPU=2 MEM=10e9'")
    return out


def parse_fraction(text: str) -> float | None:
    """``"0.6"`` -> 0.6; ``"false"``/``"none"``/``"0"`` -> None (threshold disabled)."""
    if str(text).lower() in ("false", "none", "0", ""):
        return None
    try:
        value = float(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a fraction like 0.6 or false"
        ) from None
    if not 0 < value <= 1:
        raise click.BadParameter(f"{text!r} must be between 0 and 1")
    return value


def parse_seconds(text: str | None) -> float | None:
    """``"960s"``, ``"20m"``, ``"1h"``, ``"90"`` -> seconds."""
    if text in (None, "", "None"):
        return None
    m = re.fullmatch(r"\s*([0-9.]+)\s*(s|m|h|ms)?\s*", str(text))
    if not m:
        raise click.BadParameter(f"{text!r} is not a duration like 90, 960s, 20m or 1h")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    return float(m.group(1)) * scale


class ParentGone(ZdistError):
    """Stdin closed before the broker's address came: the parent that started us is
    gone (or its broker never started)."""


def read_address_stream() -> str:
    """The broker's address: one line on stdin (after the keys line, if any)."""
    line = sys.stdin.buffer.readline()
    if not line:
        raise ParentGone("stdin closed before the broker's address came")
    return line.decode().strip()


def resolve_connection(
    address: str | None,
    scheduler_file: str | None,
    security_file: str | None,
    no_security: bool,
    death_timeout: float | None = None,
) -> tuple[str, Security | None]:
    """The broker address and keys from the command line, a scheduler file or stdin.

    ADDRESS ``-`` reads it from stdin, after the keys line if those come on stdin too:
    LocalCluster starts its workers before its broker has an address, so their
    interpreter start and imports overlap the broker's.
    """
    info: dict = {}
    keys_read = False
    stdin_keys: Security | None = None
    if address == "-":
        if security_file == "-" and not no_security:
            stdin_keys, keys_read = read_security_stream(), True
        address = read_address_stream()
    if scheduler_file:
        info = wait_for_scheduler_file(scheduler_file, death_timeout)
        address = address or info.get("address")
    if not address:
        raise ZdistError("give the broker's ADDRESS or --scheduler-file")
    split_address(address)
    if is_ipc(address):
        check_local_socket(address)
    if no_security:
        return address, None
    if keys_read:
        sec: Security | None = stdin_keys
    elif security_file == "-":
        sec = read_security_stream()
    elif security_file:
        sec = Security.from_file(security_file)
    elif info.get("security"):
        sec = Security.from_dict(info["security"])
    elif scheduler_file and "security" in info and info["security"] is None:
        raise SecurityError(
            f"{scheduler_file} says the broker runs without security; pass "
            f"--no-security to join it"
        )
    else:
        raise SecurityError(
            f"no credentials for {address}: zdist clusters are secured by default. "
            f"Pass --scheduler-file (written by zbroker), --security-file PATH, or "
            f"--no-security for a broker started with --no-security"
        )
    return address, sec


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("address", required=False)
@click.option(
    "--scheduler-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Broker address and keys, written by zbroker --scheduler-file.",
)
@click.option(
    "--security-file",
    default=None,
    help="The cluster's keys ('-': one JSON line on stdin).",
)
@click.option(
    "--no-security", is_flag=True, help="Join a broker started with --no-security."
)
@click.option(
    "--nthreads",
    type=int,
    default=None,
    help="Threads per worker process [default: cores / nworkers].",
)
@click.option(
    "--nworkers",
    type=int,
    default=1,
    show_default=True,
    help="Worker processes to start and supervise.",
)
@click.option(
    "--memory-limit",
    default="auto",
    show_default=True,
    help="Per worker: 4GB, 500MiB, a fraction of RAM (0.5), 0 for none, or auto.",
)
@click.option(
    "--name", default=None, help="Worker name (suffixed -0, -1... with --nworkers)."
)
@click.option(
    "--resources", default=None, help='Abstract resources, e.g. "GPU=2 MEM=10e9".'
)
@click.option("--local-directory", default=None, help="Scratch space for spilled data.")
@click.option(
    "--interface", default=None, help="Serve peers on this interface, e.g. ib0."
)
@click.option(
    "--death-timeout",
    default=None,
    help="Exit if the broker cannot be reached for this long (e.g. 60, 5m).",
)
@click.option(
    "--lifetime",
    default=None,
    help="Hand work back and exit after this long (e.g. 960s): before walltime.",
)
@click.option(
    "--memory-target-fraction",
    default="0.6",
    show_default=True,
    help="Spill results to disk above this fraction of the limit (false: never).",
)
@click.option(
    "--memory-spill-fraction",
    default="0.7",
    show_default=True,
    help="Spill when process memory is above this fraction (false: never).",
)
@click.option(
    "--memory-pause-fraction",
    default="0.8",
    show_default=True,
    help="Stop taking tasks above this fraction (false: never).",
)
@click.option(
    "--memory-terminate-fraction",
    default="0.95",
    show_default=True,
    help="Restart the worker above this fraction (false: never).",
)
@click.option(
    "--nanny/--no-nanny",
    default=True,
    show_default=True,
    help="Run workers in supervised child processes that restart on crash.",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@click.option(
    "--lifeline",
    is_flag=True,
    hidden=True,
    help="Exit when stdin closes (the parent that started us died).",
)
@click.version_option(__version__, prog_name="zworker")
def main(
    address: str | None,
    scheduler_file: str | None,
    security_file: str | None,
    no_security: bool,
    nthreads: int | None,
    nworkers: int,
    memory_limit: str,
    name: str | None,
    resources: str | None,
    local_directory: str | None,
    interface: str | None,
    death_timeout: str | None,
    lifetime: str | None,
    memory_target_fraction: str,
    memory_spill_fraction: str,
    memory_pause_fraction: str,
    memory_terminate_fraction: str,
    nanny: bool,
    log_level: str,
    lifeline: bool,
) -> None:
    """Start zdist workers that take tasks from the broker at ADDRESS.

    ADDRESS "-" reads it as a line on stdin (after the keys, with --security-file -).
    """
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if nworkers < 1:
        raise click.BadParameter("must be at least 1", param_hint="--nworkers")
    death = parse_seconds(death_timeout)
    # Now, while we may wait for the broker's address: forked workers inherit it.
    tune_for_service()
    try:
        addr, security = resolve_connection(
            address, scheduler_file, security_file, no_security, death
        )
        if interface:
            interface_ip(interface)
    except ParentGone as exc:
        if lifeline:  # the parent went away first: nothing to report to anyone
            logger.info("%s; exiting", exc)
            sys.exit(0)
        raise click.ClickException(str(exc)) from None
    except ZdistError as exc:
        raise click.ClickException(str(exc)) from None
    resource_map = parse_resources(resources)
    gpus: list[str] = []
    if resource_map.get("GPU") == "auto":
        # One worker process per visible GPU, each pinned to its device.
        gpus = detect_gpus()
        if not gpus:
            raise click.ClickException(
                "GPU=auto found no GPU: CUDA_VISIBLE_DEVICES is unset and "
                "`nvidia-smi -L` lists none"
            )
        if nworkers not in (1, len(gpus)):
            raise click.BadParameter(
                f"GPU=auto starts one worker per GPU ({len(gpus)} here)",
                param_hint="--nworkers",
            )
        nworkers = len(gpus)
        resource_map["GPU"] = 1.0
    threads = nthreads or max(1, (os.cpu_count() or 1) // nworkers)
    base = name or f"{os.uname().nodename}-{os.getpid()}"
    configs = [
        WorkerConfig(
            address=addr,
            security=security,
            name=base if nworkers == 1 else f"{base}-{i}",
            nthreads=threads,
            memory_limit=resolve_memory_limit(memory_limit, nworkers),
            resources=dict(resource_map),
            env={"CUDA_VISIBLE_DEVICES": gpus[i]} if gpus else {},
            local_directory=local_directory or "",
            interface=interface,
            death_timeout=death,
            lifetime=parse_seconds(lifetime),
            memory_target_fraction=parse_fraction(memory_target_fraction),
            memory_spill_fraction=parse_fraction(memory_spill_fraction),
            memory_pause_fraction=parse_fraction(memory_pause_fraction),
            memory_terminate_fraction=parse_fraction(memory_terminate_fraction),
        )
        for i in range(nworkers)
    ]
    if not nanny:
        if nworkers != 1:
            raise click.BadParameter(
                "--no-nanny runs one worker", param_hint="--nworkers"
            )
        from zdist.worker.nanny import worker_environment

        for var, value in worker_environment().items():
            os.environ.setdefault(var, value)
        worker = Worker(configs[0])
        signal.signal(signal.SIGTERM, lambda *_: worker.close_gracefully("SIGTERM"))
        signal.signal(signal.SIGINT, lambda *_: worker.close_gracefully("SIGINT"))
        if lifeline:
            watch_stdin(worker.stop)
        worker.run()  # closes its sockets on the way out
        exit_now(0)
    sup = Nanny(configs, log_level)

    def stop(*_: object) -> None:
        threading.Thread(target=sup.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if lifeline:

        def orphaned() -> None:
            sup.close_stdin()
            sup.stop(graceful=False)

        watch_stdin(orphaned)
    exit_now(sup.run())


if __name__ == "__main__":
    main()
