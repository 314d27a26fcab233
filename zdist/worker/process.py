"""One worker process: started by the nanny, forked from it or as a fresh interpreter.

Forked (Linux), the child calls :func:`run_worker` directly with the configuration it
inherited. Spawned (``python -m zdist.worker.process``, elsewhere), it reads its
configuration as one JSON line on stdin. Either way stdin is a pipe from the nanny and
its end of file (the nanny died) stops the worker; SIGTERM hands work back, then the
process exits 0.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from typing import Any

from zdist._gc import tune_for_service
from zdist._lifeline import exit_now, watch_stdin
from zdist.worker.worker import Worker, WorkerConfig


def run_worker(config: WorkerConfig) -> int:
    """Run a worker until it stops; the process's exit status (0: a planned exit)."""
    tune_for_service()  # cheap in a forked worker: the nanny froze what it imported
    worker = Worker(config)
    signal.signal(signal.SIGTERM, lambda *_: worker.close_gracefully("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: worker.close_gracefully("SIGINT"))
    watch_stdin(worker.stop)
    worker.run()
    return 0


def config_from_json(line: str | bytes) -> WorkerConfig:
    from zdist.security import Security

    data: dict[str, Any] = json.loads(line)
    sec = data.pop("security")
    return WorkerConfig(security=Security.from_dict(sec) if sec else None, **data)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    level = argv[argv.index("--log-level") + 1] if "--log-level" in argv else "info"
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    line = sys.stdin.buffer.readline()
    if not line:
        return 1
    return run_worker(config_from_json(line))


if __name__ == "__main__":
    exit_now(main())
