"""Recent log lines of a process, for Client.get_scheduler_logs/get_worker_logs."""

from __future__ import annotations

import logging
from collections import deque

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
