"""zdist.progress: live tqdm bars per task group, in a real pseudo-terminal."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import textwrap
import threading
from pathlib import Path

import pytest
import tasks
from utils import wait_for

from zdist import progress

pytestmark = pytest.mark.timeout(180)
#: Seconds the test waits for the bar to move (the gated tasks wait 150).
GATE_WAIT = 60

# Tasks 100..199 wait for a gate file that the test creates only after the terminal
# showed an intermediate percentage, so that percentage was drawn while work was
# still running (not replayed at the end). The tasks give up waiting only well after
# the test has (GATE_WAIT), so a bar that never moves fails instead of hanging.
SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from zdist import Client, LocalCluster, progress

    GATE = sys.argv[1]

    def step(i):
        if i >= 100:
            deadline = time.monotonic() + 150
            while not os.path.exists(GATE) and time.monotonic() < deadline:
                time.sleep(0.01)
        return i

    if __name__ == "__main__":
        with LocalCluster(n_workers=2, threads_per_worker=1,
                          dashboard_address=None) as cluster, Client(cluster) as c:
            first = c.map(step, range(100))
            rest = c.map(step, range(100, 200))
            progress(first, rest)  # tqdm's defaults, as a user gets them
            assert all(f.done() for f in first + rest)
            print("PROGRESS RETURNED", sum(c.gather(first + rest)), flush=True)
    """
)

PERCENT = re.compile(r"(\d+)%\|")


class Terminal:
    """A child process on a pseudo-terminal (what a user over ssh has) and all it
    writes."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            close_fds=True,
            env={**os.environ, "TERM": "xterm"},
        )
        os.close(slave)
        self.master = master
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            with self._lock:
                self._chunks.append(data)

    def text(self) -> str:
        with self._lock:
            return b"".join(self._chunks).decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._reader.join(10)
        os.close(self.master)


def test_progress_bar_in_a_terminal_moves_and_completes(tmp_path: Path) -> None:
    script = tmp_path / "run_progress.py"
    script.write_text(SCRIPT)
    gate = tmp_path / "gate"
    term = Terminal([sys.executable, str(script), str(gate)], tmp_path)
    try:

        def intermediate() -> list[int]:
            seen = [p for p in map(int, PERCENT.findall(term.text())) if 0 < p < 100]
            if not seen and term.proc.poll() is not None:
                raise AssertionError(f"exited before the gate: {term.text()[-3000:]}")
            return seen

        wait_for(
            intermediate,
            timeout=GATE_WAIT,
            what="a percentage between 0% and 100% while half the tasks are held",
        )
        gate.touch()
        assert term.proc.wait(90) == 0, term.text()[-3000:]
        term._reader.join(10)
        out = term.text()
    finally:
        gate.touch()
        term.close()
    # All 200 tasks share the group "step": one bar, which reaches 100%.
    assert "step" in out
    assert re.search(r"step: +100%\|[^\n]*\| 200/200", out), out[-2000:]
    assert f"PROGRESS RETURNED {sum(range(200))}" in out


def test_progress_shows_each_group_and_errors(client) -> None:
    good = client.map(tasks.inc, range(20))
    bad = client.map(tasks.fail, range(3))
    out = io.StringIO()
    progress(good, bad, file=out, mininterval=0)
    assert all(f.done() for f in good + bad)
    text = out.getvalue()
    assert re.search(r"inc: +100%\|[^\r\n]*\| 20/20", text), text
    assert re.search(r"fail: +100%\|[^\r\n]*\| 3/3[^\r\n]*erred=3", text), text
    assert "erred" not in "".join(
        line for line in text.replace("\r", "\n").splitlines() if line.startswith("inc")
    )


def test_progress_single_bar_and_incomplete_only(client) -> None:
    done = client.map(tasks.inc, range(5))
    client.gather(done)
    more = client.map(tasks.double, range(7))
    out = io.StringIO()
    # multi=False: one bar for everything; complete=False: only what was not done yet.
    progress(done, more, multi=False, complete=False, file=out, mininterval=0)
    text = out.getvalue()
    assert "inc" not in text and "double" not in text
    assert re.search(r"tasks: +100%\|[^\r\n]*\| 7/7", text), text


def test_progress_follows_a_persisted_dask_collection(client) -> None:
    da = pytest.importorskip("dask.array")
    x = client.persist(da.ones(40, chunks=10) + 1)
    out = io.StringIO()
    progress(x, file=out, mininterval=0)
    assert re.search(r"100%\|[^\r\n]*\| 4/4", out.getvalue()), out.getvalue()
    assert float(client.compute(x.sum()).result()) == 80.0
    with pytest.raises(TypeError, match="persist"):
        progress(da.ones(4, chunks=2), file=io.StringIO())
