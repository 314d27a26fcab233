from __future__ import annotations

import platform
from typing import Any

__version__ = "0.1.0"


def versions() -> dict[str, Any]:
    """What must match between client, broker and workers (the seed stresses one
    Python everywhere: a pickled function needs the same Python and cloudpickle)."""
    import cloudpickle
    import zmq

    return {
        "python": platform.python_version(),
        "zdist": __version__,
        "cloudpickle": cloudpickle.__version__,
        "pyzmq": zmq.__version__,
    }


def mismatches(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    out = []
    for name in ("python", "zdist", "cloudpickle"):
        a, b = mine.get(name), theirs.get(name)
        if name == "python" and a and b:
            a, b = ".".join(str(a).split(".")[:2]), ".".join(str(b).split(".")[:2])
        if a != b:
            out.append(f"{name} {mine.get(name)} here, {theirs.get(name)} there")
    return out
