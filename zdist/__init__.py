"""zdist: a distributed task broker on ZeroMQ with dask.distributed's API.

Switch from dask by changing the import: ``from zdist import Client, LocalCluster``.
"""

from __future__ import annotations

from zdist._version import __version__
from zdist.client.client import Client, default_client
from zdist.client.future import Future
from zdist.client.jobqueue import PBSCluster, SLURMCluster
from zdist.client.local import LocalCluster
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
