"""Which task groups a worker may run on its I/O thread (FunctionCache.is_quick)."""

from __future__ import annotations

import time

import cloudpickle
import pytest

from zdist import serialize
from zdist.keys import key_group
from zdist.worker.execute import (
    QUICK_AFTER_RUNS,
    QUICK_TASK_SECONDS,
    SLOW_TASK_SECONDS,
    FunctionCache,
    run_task,
)

pytestmark = pytest.mark.timeout(10)

QUICK = QUICK_TASK_SECONDS / 10
SLOW = QUICK_TASK_SECONDS * 10


def test_a_group_is_quick_after_enough_quick_runs() -> None:
    cache = FunctionCache()
    for _ in range(QUICK_AFTER_RUNS - 1):
        cache.record("inc", QUICK)
        assert not cache.is_quick("inc")
    cache.record("inc", QUICK)
    assert cache.is_quick("inc")
    assert not cache.is_quick("other")


def test_one_slow_run_counts_until_enough_quick_ones_follow() -> None:
    # A first run slowed by imports, or a run whose thread was preempted on a busy
    # machine, must not keep a quick function off the fast path for good.
    cache = FunctionCache()
    cache.record("inc", SLOW)
    for _ in range(QUICK_AFTER_RUNS):
        assert not cache.is_quick("inc")
        cache.record("inc", QUICK)
    assert cache.is_quick("inc")
    cache.record("inc", SLOW)
    assert not cache.is_quick("inc")


def test_groups_are_forgotten_past_the_cache_size() -> None:
    cache = FunctionCache(size=4)
    for name in "abcdef":
        for _ in range(QUICK_AFTER_RUNS):
            cache.record(name, QUICK)
    assert cache.is_quick("f")
    assert len(cache._quick_runs) <= 5


def test_a_group_that_once_ran_long_never_runs_on_the_io_thread() -> None:
    # A long run inline would hold up the worker's heartbeats, transfers and cancels.
    cache = FunctionCache()
    cache.record("load", SLOW_TASK_SECONDS)
    for _ in range(10 * QUICK_AFTER_RUNS):
        cache.record("load", QUICK)
    assert not cache.is_quick("load")


def _fail_after(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    raise ValueError("no")


def test_a_run_that_raises_counts_too() -> None:
    cache = FunctionCache()
    for _ in range(QUICK_AFTER_RUNS):
        cache.record(key_group("fail_after-1"), QUICK)
    assert cache.is_quick(key_group("fail_after-1"))
    fn = [cloudpickle.dumps(_fail_after)]
    out = run_task("fail_after-2", fn, serialize.dumps(((SLOW,), {})), None, cache)
    assert not out.ok
    assert not cache.is_quick(key_group("fail_after-2"))
