"""Entry point of one worker process (started by the nanny; not a user command).

Reads its configuration as one JSON line on stdin, runs a :class:`Worker`, and exits
when stdin reaches end of file (the supervisor died) or on SIGTERM (hand work back,
then exit 0).
"""

from __future__ import annotations

import logging
import signal
import sys

from zdist._lifeline import watch_stdin
from zdist.worker.nanny import config_from_json
from zdist.worker.worker import Worker


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
    worker = Worker(config_from_json(line))

    watch_stdin(worker.stop)
    signal.signal(signal.SIGTERM, lambda *_: worker.close_gracefully("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: worker.close_gracefully("SIGINT"))
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
