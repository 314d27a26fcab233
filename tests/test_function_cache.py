"""Which task groups a worker may run on its I/O thread (FunctionCache.is_quick)."""

from __future__ import annotations

import pytest

from zdist.worker.execute import QUICK_AFTER_RUNS, QUICK_TASK_SECONDS, FunctionCache

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
