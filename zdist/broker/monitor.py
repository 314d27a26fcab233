"""What the broker remembers for people watching it: task groups, a task stream,
recent errors and log lines. Pure bookkeeping fed by the state machine; the dashboard,
``zdist status`` and ``Client.get_task_stream`` read :meth:`Monitor.status`.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

from zdist.keys import key_group

#: Task-stream entries kept (dask keeps the last 100,000; the dashboard shows minutes).
STREAM_LENGTH = 20_000
#: Recent errors kept with their text.
ERRORS_LENGTH = 50
#: Task groups kept (oldest idle ones are dropped first).
GROUPS_LENGTH = 200


class Monitor:
    def __init__(self) -> None:
        self.groups: OrderedDict[str, list[int]] = OrderedDict()  # [total, done, erred]
        self.stream: deque[tuple[str, str, str, float, float, str]] = deque(
            maxlen=STREAM_LENGTH
        )
        self.errors: deque[dict[str, Any]] = deque(maxlen=ERRORS_LENGTH)

    def _group(self, name: str) -> list[int]:
        g = self.groups.get(name)
        if g is None:
            g = self.groups[name] = [0, 0, 0]
            if len(self.groups) > GROUPS_LENGTH:
                self.groups.popitem(last=False)
        return g

    def submitted(self, key: str) -> str:
        """Count a new task; returns its group, which the caller keeps."""
        name = key_group(key)
        self._group(name)[0] += 1
        return name

    def finished(
        self, key: str, group: str, worker: str, duration: float, now: float
    ) -> None:
        self._group(group)[1] += 1
        if duration >= 0:
            self.stream.append((key, group, worker, now - duration, now, "memory"))

    def erred(
        self, key: str, group: str, worker: str, duration: float, text: str, now: float
    ) -> None:
        self._group(group)[2] += 1
        self.stream.append((key, group, worker, now - max(duration, 0), now, "error"))
        self.errors.append({"key": key, "worker": worker, "time": now, "text": text})

    def task_stream(self, since: float = 0.0) -> list[dict[str, Any]]:
        return [
            {"key": k, "group": g, "worker": w, "start": s, "stop": e, "status": st}
            for k, g, w, s, e, st in self.stream
            if e >= since
        ]

    def group_progress(self) -> list[dict[str, Any]]:
        return [
            {"name": name, "total": t, "done": d, "erred": e}
            for name, (t, d, e) in self.groups.items()
        ]
