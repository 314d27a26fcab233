"""Data placement and movement: results stay on workers and move peer to peer."""

from __future__ import annotations

import numpy as np
import pytest
import tasks

from zdist import Client

pytestmark = pytest.mark.timeout(60)

MB = 1_000_000


def _forwarded(c: Client) -> int:
    return c.scheduler_info()["counters"]["payload_bytes_forwarded"]


def test_large_result_moves_worker_to_worker_not_through_broker(client: Client) -> None:
    names = sorted(w["name"] for w in client.scheduler_info()["workers"].values())
    before = _forwarded(client)
    big = client.submit(tasks.make_bytes, 64 * MB, workers=[names[0]], pure=False)
    n = client.submit(tasks.length, big, workers=[names[1]], pure=False)
    assert n.result() == 64 * MB
    assert _forwarded(client) - before < 1 * MB
    # ... and the consumer really ran on the other worker
    where = client.submit(tasks.worker_name, big, workers=[names[1]], pure=False)
    assert where.result() == names[1]


def test_dependent_runs_where_its_large_input_is(client: Client) -> None:
    big = client.submit(tasks.make_bytes, 8 * MB, pure=False)
    producer = client.submit(tasks.worker_name, big, pure=False).result()
    # One at a time (no pressure to spread): each follows the 8 MB, where a placement
    # that ignored data would pick either of the two idle workers.
    for i in range(4):
        assert client.submit(tasks.worker_name, big, i, pure=False).result() == producer


def test_numpy_arrays_round_trip(client: Client) -> None:
    x = np.arange(1_000_000, dtype="f8").reshape(1000, 1000)
    fx = client.scatter(x)
    y = client.submit(np.multiply, fx, 2).result()
    np.testing.assert_array_equal(y, x * 2)
    assert client.submit(np.sum, fx).result() == x.sum()


def test_large_result_gathered_to_client(client: Client) -> None:
    f = client.submit(np.ones, 5_000_000, pure=False)
    out = f.result()
    assert out.shape == (5_000_000,) and out.sum() == 5_000_000
