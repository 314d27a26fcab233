"""Adaptive: how many jobs a cluster wants for the work queued (its ``adapt()``)."""

from __future__ import annotations

import collections
import math
import weakref
from typing import TYPE_CHECKING

from zdist.client.jobs import _seconds

if TYPE_CHECKING:
    from zdist.client.jobqueue import JobQueueCluster


class Adaptive:
    """Grow with queued tasks, shrink after ``wait_count`` idle checks (dask's names).

    The target is the number of jobs whose threads cover the outstanding tasks
    (ready + waiting + processing), between ``minimum`` and ``maximum`` jobs. Growing
    is immediate; shrinking waits ``wait_count`` checks in a row, so workers do not
    churn between two computations.
    """

    def __init__(
        self,
        cluster: JobQueueCluster,
        minimum: int = 0,
        maximum: float = math.inf,
        interval: float | str = "1s",
        wait_count: int = 3,
    ) -> None:
        if minimum < 0 or maximum < minimum:
            raise ValueError(
                f"adapt needs 0 <= minimum_jobs <= maximum_jobs, got {minimum}, "
                f"{maximum}"
            )
        if wait_count < 1:
            raise ValueError(f"wait_count must be at least 1, not {wait_count!r}")
        self._cluster = weakref.ref(cluster)
        self.minimum = minimum
        self.maximum = maximum
        self.interval = _seconds(interval)
        self.wait_count = wait_count
        self._below = 0
        self.log: collections.deque[tuple[float, int]] = collections.deque(maxlen=100)

    def recommendation(self, outstanding: int, slots_per_job: int, current: int) -> int:
        wanted = math.ceil(outstanding / max(1, slots_per_job))
        wanted = int(min(self.maximum, max(self.minimum, wanted)))
        if wanted >= current:
            self._below = 0
            return wanted
        self._below += 1
        if self._below < self.wait_count:
            return current
        self._below = 0
        return wanted

    def stop(self) -> None:
        cluster = self._cluster()
        if cluster is not None and cluster._adaptive is self:
            cluster._adaptive = None
