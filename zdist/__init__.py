"""zdist: a distributed task broker on ZeroMQ with dask.distributed's API.

Switch from dask by changing the import: ``from zdist import Client, LocalCluster``.

Names are imported on first use (PEP 562), so ``python -m zdist.worker`` and
``python -m zdist.broker`` start without loading the client side.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from zdist._version import __version__

_EXPORTS = {
    "Client": "zdist.client.client",
    "default_client": "zdist.client.client",
    "Future": "zdist.client.future",
    "LocalCluster": "zdist.client.local",
    "PBSCluster": "zdist.client.pbs",
    "SLURMCluster": "zdist.client.slurm",
    "as_completed": "zdist.client.waiting",
    "fire_and_forget": "zdist.client.waiting",
    "progress": "zdist.client.waiting",
    "wait": "zdist.client.waiting",
    "CommClosedError": "zdist.errors",
    "FutureCancelledError": "zdist.errors",
    "GraphError": "zdist.errors",
    "KilledWorker": "zdist.errors",
    "RemoteError": "zdist.errors",
    "SecurityError": "zdist.errors",
    "ZdistError": "zdist.errors",
    "Security": "zdist.security",
    "get_client": "zdist.worker.context",
    "get_worker": "zdist.worker.context",
    "rejoin": "zdist.worker.context",
    "secede": "zdist.worker.context",
}

__all__ = [
    "Client",
    "CommClosedError",
    "Future",
    "FutureCancelledError",
    "GraphError",
    "KilledWorker",
    "LocalCluster",
    "PBSCluster",
    "RemoteError",
    "SLURMCluster",
    "Security",
    "SecurityError",
    "ZdistError",
    "__version__",
    "as_completed",
    "default_client",
    "fire_and_forget",
    "get_client",
    "get_worker",
    "progress",
    "rejoin",
    "secede",
    "wait",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'zdist' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:
    from zdist.client.client import Client, default_client
    from zdist.client.future import Future
    from zdist.client.local import LocalCluster
    from zdist.client.pbs import PBSCluster
    from zdist.client.slurm import SLURMCluster
    from zdist.client.waiting import as_completed, fire_and_forget, progress, wait
    from zdist.errors import (
        CommClosedError,
        FutureCancelledError,
        GraphError,
        KilledWorker,
        RemoteError,
        SecurityError,
        ZdistError,
    )
    from zdist.security import Security
    from zdist.worker.context import get_client, get_worker, rejoin, secede
