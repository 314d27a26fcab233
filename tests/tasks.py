"""Task functions importable by worker processes (tests put tests/ on PYTHONPATH)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any


def inc(x: int) -> int:
    return x + 1


def add(x: int, y: int) -> int:
    return x + y


def double(x: int) -> int:
    return 2 * x


def total(xs: list[int]) -> int:
    return sum(xs)


def identity(x: Any) -> Any:
    return x


def noop(x: Any = None) -> None:
    return None


def fail(x: Any = None) -> None:
    raise ValueError(f"bad value {x!r}")


def slow_inc(x: int, delay: float = 0.1) -> int:
    time.sleep(delay)
    return x + 1


def pid(x: Any = None) -> int:
    return os.getpid()


def make_bytes(n: int, *_: Any) -> bytes:
    return b"x" * n


def length(*xs: Any) -> int:
    return sum(len(x) for x in xs)


def touch(path: str) -> str:
    with open(path, "w") as f:
        f.write("ran")
    return path


def worker_name(*_: Any) -> str:
    from zdist import get_worker

    return get_worker().name


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("this object refuses to be pickled")


def broker_address_of_worker(*_: Any) -> str:
    from zdist import get_worker

    return get_worker().broker_address


def return_unpicklable(x: Any = None) -> Unpicklable:
    return Unpicklable()


class CustomError(Exception):
    pass


def raise_custom(x: Any = None) -> None:
    raise CustomError(f"custom failure {x}")


def getenv(name: str) -> str | None:
    return os.environ.get(name)


def counted_bytes(path: str, n: int) -> bytes:
    """``n`` bytes; appends a line to ``path`` each time it runs (counts executions)."""
    with open(path, "a") as f:
        f.write("ran\n")
    return b"y" * n


def wait_for_path(path: str) -> str:
    """A task that holds its worker's thread until ``path`` exists (60 s at most)."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)
    return path


def die_once(path: str) -> int:
    """Kill this process the first time (leaving ``path``); return 42 after."""
    if not os.path.exists(path):
        Path(path).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return 42
