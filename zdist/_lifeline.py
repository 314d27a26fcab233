"""The lives of zdist's own processes (broker, supervisor, worker).

A child's stdin is a pipe from its parent, and end of file on it means the parent died
(even by SIGKILL), so no child outlives it. Such a process ends with :func:`exit_now`
once it has closed its sockets.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import NoReturn


def watch_stdin(callback: Callable[[], object]) -> None:
    """Call ``callback`` (from a daemon thread) when stdin reaches end of file."""

    def watch() -> None:
        try:
            # os.read on the raw descriptor: a buffered reader's lock would block
            # interpreter shutdown while this daemon thread waits in it.
            while os.read(0, 1024):
                pass
        except OSError:
            pass
        callback()

    threading.Thread(target=watch, name="lifeline", daemon=True).start()


def exit_now(code: int = 0) -> NoReturn:
    """Flush the logs and stdio, then end the process without the interpreter's
    teardown (freeing every module and object: ~50 ms, a large part of a
    LocalCluster's close). Only for a process that has closed its sockets and has no
    atexit work: atexit handlers do not run."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
