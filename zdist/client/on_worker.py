"""Functions the Client sends to run on workers (through Client.run or as tasks):
they execute in the worker process, never in the client's."""

from __future__ import annotations

import os
from typing import Any


def _worker_logs(n: int | None) -> list[tuple[str, str]]:
    from zdist.logs import log_buffer

    records = list(log_buffer().records)
    return records[-n:] if n else records


def _count(xs: list[Any]) -> int:
    return len(xs)


def _install_file(name: str, data: bytes, load: bool) -> str:
    import importlib
    import sys

    from zdist.worker.context import get_worker

    directory = get_worker().local_directory
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    if name.endswith((".zip", ".egg")) and path not in sys.path:
        sys.path.insert(0, path)
    importlib.invalidate_caches()
    if load and name.endswith(".py"):
        mod = name[:-3]
        if mod in sys.modules:
            importlib.reload(sys.modules[mod])
        else:
            importlib.import_module(mod)
    return path
