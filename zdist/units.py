"""Sizes with dask's units, one parser for every command and cluster class."""

from __future__ import annotations

import re
from decimal import Decimal

_DECIMAL = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}
_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50}
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_memory(value: str | int) -> int:
    """Bytes in `value`, with dask's units: "500MB" = 5e8, "4GiB" = 4 * 2**30."""
    if _is_int(value):
        n = int(value)
    else:
        match = _MEMORY_RE.match(value) if isinstance(value, str) else None
        if match is None:
            raise ValueError(
                f"memory must be a size like '192GB' or '4GiB', not {value!r}"
            )
        number, unit = match.group(1), match.group(2).lower()
        unit = unit[:-1] if unit.endswith("b") and len(unit) > 1 else unit
        scale = _DECIMAL.get(unit) or _BINARY.get(unit)
        if scale is None:
            raise ValueError(f"unknown memory unit {match.group(2)!r} in {value!r}")
        # Decimal, so "1.5TB" is exactly 1.5e12 bytes, not a float's neighbour.
        n = int(Decimal(number) * scale)
    if n <= 0:
        raise ValueError(f"memory must be positive, not {value!r}")
    return n
