"""Exit when the parent goes away: a child's stdin is a pipe from its parent, and end
of file on it means the parent died (even by SIGKILL), so no child outlives it."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


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
