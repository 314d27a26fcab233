"""Garbage-collector settings for zdist's own long-running processes.

The broker keeps a record (with its sets and lists) per task and creates and drops
tens of thousands of them per second; at CPython's default thresholds (700, 10, 10)
the cyclic collector then runs a full collection every few hundred thousand
allocations, each one walking every live task record: about 30% of the broker's time
on a 20,000-task map (measured with gc.callbacks). The state machine makes no
reference cycles in normal operation, so collecting far less often loses nothing.

Only ``zbroker`` and ``zworker`` processes call this: a client runs inside the user's
program, whose collector is the user's business.
"""

from __future__ import annotations

import gc

#: Allocations between young collections, and collections between older ones.
THRESHOLDS = (10_000, 50, 50)


def tune_for_service() -> None:
    """Freeze what was imported so far (never garbage, never walked again) and raise
    the collection thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
