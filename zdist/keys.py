"""Task-key helpers shared by the broker (task groups) and the client (progress bars).

Kept apart from both so that the client never imports the broker package.
"""

from __future__ import annotations

import re

_HEX = re.compile(r"^[0-9a-f]{8,}$")
_TUPLE_HEAD = re.compile(r"\(\s*['\"]([^'\"]+)['\"]")


#: key_group of "<head>-<token>" keys by head (the keys of one map or graph layer
#: differ only in their last token); bounded, cleared when full.
_BY_HEAD: dict[str, str] = {}
_BY_HEAD_SIZE = 4096


def key_group(key: str) -> str:
    """:func:`split_key`, remembered for keys that end in a digit or hex token."""
    head, _, tail = key.rpartition("-")
    if not head or key[0] == "(" or not (tail.isdigit() or _HEX.match(tail)):
        return split_key(key)
    group = _BY_HEAD.get(head)
    if group is None:
        group = split_key(key)
        if group == key:
            return group  # no word of the head kept: the group is the key itself
        # The token is dropped and a word of the head kept: every "<head>-<token>"
        # key has this group.
        if len(_BY_HEAD) >= _BY_HEAD_SIZE:
            _BY_HEAD.clear()
        _BY_HEAD[head] = group
    return group


def split_key(key: str) -> str:
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
