from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
# Worker processes import task functions from tests/tasks.py.
if HERE not in sys.path:
    sys.path.insert(0, HERE)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [HERE, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    """A real 2-worker LocalCluster (child broker and worker processes), shared by a
    module's tests."""
    from zdist import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1) as c:
        yield c


@pytest.fixture
def client(cluster: object) -> Iterator[object]:
    from zdist import Client

    with Client(cluster) as c:
        yield c
