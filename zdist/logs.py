"""Recent log lines of a process, for Client.get_scheduler_logs/get_worker_logs."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

#: Log lines kept per process.
LOG_LENGTH = 1_000


class LogBuffer(logging.Handler):
    """Keeps the last LOG_LENGTH formatted records (dask's get_*_logs)."""

    def __init__(self, length: int = LOG_LENGTH) -> None:
        super().__init__(logging.INFO)
        self.records: deque[tuple[str, str]] = deque(maxlen=length)
        self.setFormatter(
            logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
        )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append((record.levelname, self.format(record)))
        except Exception:
            self.handleError(record)


_log_buffer: LogBuffer | None = None


def log_buffer() -> LogBuffer:
    """The process's log buffer, installed on the ``zdist`` logger on first use."""
    global _log_buffer
    if _log_buffer is None:
        _log_buffer = LogBuffer()
        logging.getLogger("zdist").addHandler(_log_buffer)
    return _log_buffer


class RateLimitedLog:
    """Logs a kind of problem at most once per ``period`` seconds, with a count."""

    def __init__(self, logger: logging.Logger, period: float = 5.0) -> None:
        self.logger = logger
        self.period = period
        self.last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def warning(self, kind: str, text: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last.get(kind, -1e9) >= self.period:
            n = self.suppressed.pop(kind, 0)
            message = text % args if args else text
            if n:
                message += f" ({n} similar suppressed)"
            self.logger.warning("%s", message)
            self.last[kind] = now
        else:
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
