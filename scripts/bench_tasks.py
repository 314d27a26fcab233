"""Task functions for scripts/bench.py.

They live in their own module, not in bench.py, so that worker processes load them
by import (cloudpickle pickles module-level functions by reference). bench.py puts
scripts/ on PYTHONPATH before any cluster starts, so spawned workers find this file.

Every task returns something the benchmark can check, so a scheduler that drops,
duplicates or caches a task shows up as a wrong result instead of a fast number.
"""

from __future__ import annotations

from typing import Any


def identity(x: Any) -> Any:
    return x


def noop(x: Any) -> Any:
    """W2's "no-op": no work, but it returns its argument so gather can be checked."""
    return x


def inc(x: int) -> int:
    return x + 1


def add(a: int, b: int) -> int:
    return a + b


def sum_args(*xs: int) -> int:
    return sum(xs)


def sum_list(xs: list[int]) -> int:
    return sum(xs)


def make_array(nbytes: int, fill: int) -> Any:
    import numpy as np

    # np.full touches every page, so the worker's RSS really grows by nbytes.
    return np.full(nbytes, fill % 251, dtype=np.uint8)


def total_len(*arrays: Any) -> int:
    """Sum of lengths; also reads one byte of each array so the data must be real."""
    total = 0
    for a in arrays:
        total += len(a)
        if len(a) and int(a[-1]) != int(a[0]):
            raise ValueError("array content changed in transit")
    return total
