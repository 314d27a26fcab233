"""``zbroker``: run a broker."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click
import zmq

from zdist import protocol as P
from zdist._gc import tune_for_service
from zdist._lifeline import exit_now, watch_stdin
from zdist._version import __version__
from zdist.broker.server import BrokerServer, ServerConfig
from zdist.errors import ZdistError
from zdist.logs import log_buffer
from zdist.security import (
    Security,
    read_json_file,
    read_security_stream,
    write_private_json,
)
from zdist.units import parse_memory

logger = logging.getLogger("zdist.broker")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    log_buffer()  # recent lines for Client.get_scheduler_logs()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0 for every interface).",
)
@click.option(
    "--port",
    default=None,
    type=int,
    help="TCP port [default: 8786, or the scheduler file's]; 0 picks a free one.",
)
@click.option(
    "--interface", default=None, help="Listen on this interface's address, e.g. ib0."
)
@click.option(
    "--scheduler-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write address and keys here (mode 0600); reuse both if it exists.",
)
@click.option(
    "--security-file",
    default=None,
    help="Load the cluster's keys from this file ('-': one JSON line on stdin).",
)
@click.option(
    "--no-security",
    is_flag=True,
    help="Plaintext and no authentication: only on a trusted network.",
)
@click.option(
    "--heartbeat-interval",
    default=P.HEARTBEAT_INTERVAL,
    show_default=True,
    type=float,
    help="Seconds between worker heartbeats.",
)
@click.option(
    "--liveness",
    default=P.WORKER_LIVENESS,
    show_default=True,
    type=int,
    help="Missed heartbeats before a worker is declared dead.",
)
@click.option(
    "--client-liveness",
    default=P.CLIENT_LIVENESS,
    show_default=True,
    type=int,
    help="Missed client heartbeats before a client's tasks are released.",
)
@click.option(
    "--allowed-failures",
    default=3,
    show_default=True,
    type=int,
    help="Worker deaths a task may cause before it fails with KilledWorker.",
)
@click.option(
    "--client-heartbeat-interval",
    default=P.CLIENT_HEARTBEAT_INTERVAL,
    show_default=True,
    type=float,
    help="Seconds between client heartbeats (with --client-liveness: client expiry).",
)
@click.option(
    "--max-message-size",
    default="8GiB",
    show_default=True,
    help="Drop (and report) messages larger than this; a 1,000,000-task graph fits.",
)
@click.option(
    "--dashboard-address",
    default=":8787",
    show_default=True,
    help="Serve the dashboard here (localhost unless a host is given); 'none': off.",
)
@click.option(
    "--local-socket",
    default=None,
    metavar="PATH",
    help="Also listen on a Unix socket at PATH, in a directory only you can enter. "
    "Clients and workers on this host connect to ipc://PATH: the kernel checks that "
    "they run as you, and messages skip CurveZMQ (faster). Workers that join there "
    "serve data to peers on 127.0.0.1 unless given --interface.",
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
    help="Exit when stdin closes (a parent process that started us died).",
)
@click.version_option(__version__, prog_name="zbroker")
def main(
    host: str,
    port: int | None,
    interface: str | None,
    scheduler_file: str | None,
    security_file: str | None,
    no_security: bool,
    heartbeat_interval: float,
    liveness: int,
    client_liveness: int,
    allowed_failures: int,
    client_heartbeat_interval: float,
    max_message_size: str,
    dashboard_address: str,
    local_socket: str | None,
    log_level: str,
    lifeline: bool,
) -> None:
    """Start a zdist broker: clients submit tasks to it and workers run them."""
    configure_logging(log_level)
    if not (scheduler_file or security_file or no_security):
        raise click.UsageError(
            "zdist brokers are secured by default and need a way to share their keys: "
            "give --scheduler-file PATH (clients and workers read it), --security-file "
            "PATH, or --no-security on a trusted network"
        )
    try:
        security, port = _load_security(
            security_file, scheduler_file, no_security, port
        )
        server = BrokerServer(
            ServerConfig(
                host=host,
                port=port,
                interface=interface,
                heartbeat_interval=heartbeat_interval,
                liveness=liveness,
                client_liveness=client_liveness,
                allowed_failures=allowed_failures,
                client_heartbeat_interval=client_heartbeat_interval,
                max_message_bytes=_parse_size(max_message_size),
                dashboard_address=None
                if dashboard_address.lower() in ("none", "", "false")
                else dashboard_address,
                local_socket=local_socket,
            ),
            security,
        )
    except zmq.ZMQError as exc:
        if exc.errno == zmq.EADDRINUSE:
            raise click.ClickException(
                f"port {port} is already in use; pick another with --port (0: any free)"
            ) from None
        raise click.ClickException(f"cannot listen: {exc}") from None
    except ZdistError as exc:
        raise click.ClickException(str(exc)) from None
    if security is None:
        logger.warning(
            "security is OFF: anyone who can reach %s can run code as you",
            server.address,
        )
    if scheduler_file:
        try:
            write_private_json(
                scheduler_file,
                {
                    "type": "zdist-broker",
                    "address": server.address,
                    "security": security.to_dict() if security else None,
                    "pid": os.getpid(),
                    "versions": server.state.versions,
                    "dashboard": server.dashboard.link if server.dashboard else None,
                },
            )
        except ZdistError as exc:
            server.close()
            raise click.ClickException(str(exc)) from None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    if lifeline:
        watch_stdin(server.stop)
    # Scripts read the first line for the address; the dashboard link follows.
    click.echo(f"zbroker listening at {server.address}")
    if server.local_address:
        click.echo(f"zbroker local socket at {server.local_address}")
    if server.dashboard is not None:
        click.echo(f"zbroker dashboard at {server.dashboard.link}")
    sys.stdout.flush()
    logger.info("broker at %s (pid %d)", server.address, os.getpid())
    tune_for_service()
    server.serve_forever()  # closes the sockets on the way out
    logger.info("broker stopped")
    exit_now(0)


def _parse_size(text: str) -> int:
    try:
        return parse_memory(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-message-size") from None


def _load_security(
    security_file: str | None,
    scheduler_file: str | None,
    no_security: bool,
    port: int | None,
) -> tuple[Security | None, int]:
    """Keys from stdin/a file, else those of an existing scheduler file (a restarted
    broker keeps its address and keys so its workers come back), else new ones."""
    if scheduler_file and Path(scheduler_file).exists():
        old: dict[str, Any] = read_json_file(scheduler_file)
        if port is None and isinstance(old.get("address"), str):
            try:
                port = int(old["address"].rsplit(":", 1)[1])
            except ValueError:
                pass
        if security_file is None and not no_security and old.get("security"):
            return Security.from_dict(old["security"]), 8786 if port is None else port
    if port is None:
        port = 8786
    if no_security:
        return None, port
    if security_file == "-":
        return read_security_stream(), port
    if security_file:
        return Security.from_file(security_file), port
    return Security.temporary(), port


if __name__ == "__main__":
    main()
