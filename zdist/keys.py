"""Task-key helpers shared by the broker (task groups) and the client (progress bars).

Kept apart from both so that the client never imports the broker package.
"""

from __future__ import annotations

import re

_HEX = re.compile(r"^[0-9a-f]{8,}$")
_TUPLE_HEAD = re.compile(r"\(\s*['\"]([^'\"]+)['\"]")


def key_group(key: str) -> str:
    """dask's ``key_split``: ``inc-1d26...`` -> ``inc``; ``('x-ab12', 0, 1)`` -> ``x``.

    Task groups are named by it: the dashboard, ``zdist status`` and ``progress`` all
    show one line per group.
    """
    if key.startswith("("):
        m = _TUPLE_HEAD.match(key)
        if m:
            key = m.group(1)
    i = key.rfind("-")
    if 0 < i and key.find("-") == i:  # the usual "name-<token>": no word list needed
        tail = key[i + 1 :]
        if tail.isdigit() or _HEX.match(tail):
            return key[:i]
    parts = key.split("-")
    words = [p for p in parts if p and not _HEX.match(p) and not p.isdigit()]
    return "-".join(words) or key
