"""A worker's private scratch directories, removed however the worker ends.

Each worker makes its own directory (mode 0700) inside the local directory it is
given, or $TMPDIR, or /tmp, as dask's worker-XXXX inside its scratch space: spilled
results and uploaded files are nobody else's to read, and two workers never share one.

The worker removes its directories when it closes, but a worker does not always get
to close: LocalCluster.close() and an orphaned zworker kill theirs with SIGKILL, and
the supervisor kills one above its memory limit. So a :class:`Janitor`, a tiny ``sh``
child, waits for the end of file on a pipe whose writing end only the worker holds and
then removes them: the kernel closes the pipe however the worker exits.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile

logger = logging.getLogger(__name__)

_SH = "/bin/sh"
# Reads until end of file (nothing is ever written), then removes the paths in argv.
_SCRIPT = 'read -r _; exec rm -rf -- "$@"'


def make_local_directory(base: str = "") -> str:
    """A new private directory for one worker inside ``base`` (or $TMPDIR, /tmp)."""
    base = base or os.environ.get("TMPDIR") or tempfile.gettempdir()
    os.makedirs(base, mode=0o700, exist_ok=True)
    return tempfile.mkdtemp(prefix="zdist-worker-", dir=base)


class Janitor:
    """Removes ``paths`` at :meth:`close` or when this process dies, even by SIGKILL."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = list(paths)
        self.proc: subprocess.Popen[bytes] | None = None
        self._fd = -1
        if not self.paths:
            return
        read_end, write_end = os.pipe()  # not inherited by programs tasks start
        try:
            self.proc = subprocess.Popen(
                [_SH, "-c", _SCRIPT, "zdist-janitor", *self.paths],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
                # Not in the terminal's process group: a Ctrl-C must not kill the
                # janitor before the worker's graceful exit is over.
                start_new_session=True,
            )
        except OSError as exc:  # no /bin/sh: the worker's own close() still cleans
            logger.debug("no janitor for %s: %s", self.paths, exc)
            os.close(write_end)
        else:
            self._fd = write_end
        finally:
            os.close(read_end)

    def close(self, timeout: float = 5.0) -> None:
        """Remove the paths now, and let the janitor go."""
        for path in self.paths:
            shutil.rmtree(path, ignore_errors=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.proc is not None:
            try:
                self.proc.wait(timeout)  # reaped, not left a zombie
            except subprocess.TimeoutExpired:
                logger.warning("janitor %d did not exit", self.proc.pid)
