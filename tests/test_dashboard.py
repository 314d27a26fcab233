"""The broker's dashboard in a real browser (Debian's chromium, headless).

The browser is driven over ``--remote-debugging-pipe`` with a small DevTools-protocol
client written on the standard library: one page load, read repeatedly while work
runs, so every change seen there came from the page's own fetch loop, not a reload.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tasks
from utils import wait_for

from zdist import Client, LocalCluster

pytestmark = pytest.mark.timeout(180)

#: Where the screenshot goes; README's is made with
#: ZDIST_DASHBOARD_SCREENSHOT=scripts/dashboard.png.
SCREENSHOT_ENV = "ZDIST_DASHBOARD_SCREENSHOT"
WINDOW = (1400, 900)


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    reason = "chromium is not installed (Debian: apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; .ci/run installs it, so CI must have it")
    pytest.skip(reason)


class Browser:
    """Headless chromium and a DevTools-protocol session over its debugging pipe
    (fd 3: commands in, fd 4: replies and events out, each a JSON text ending in NUL).
    """

    def __init__(self, binary: str, profile: Path, log: Path) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        # Above 9, so that the shell's redirections to 3 and 4 cannot clobber them.
        cmd_r, out_w = (_high_fd(fd) for fd in (cmd_r, out_w))
        flags = [
            "--headless",
            "--no-sandbox",  # root cannot use the sandbox
            f"--user-data-dir={profile}",
            "--disable-background-networking",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--no-first-run",
            "--hide-scrollbars",
            "--remote-debugging-pipe",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            "about:blank",
        ]
        self._log = open(log, "wb")  # closed in close()
        # bash puts the pipe ends at fds 3 and 4, where chromium expects them (dash
        # cannot: it takes single-digit fds only).
        self.proc = subprocess.Popen(
            [
                "bash",
                "-c",
                f'exec "$@" 3<&{cmd_r} 4>&{out_w} {cmd_r}<&- {out_w}>&-',
                "bash",
                binary,
                *flags,
            ],
            pass_fds=(cmd_r, out_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            start_new_session=True,
        )
        os.close(cmd_r)
        os.close(out_w)
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session = ""

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                data = os.read(self._out_r, 1 << 16)
            except OSError:
                data = b""
            if not data:
                with self._cond:
                    closed = {"message": "browser closed the pipe"}
                    self._replies[-1] = {"error": closed}
                    self._cond.notify_all()
                return
            buf += data
            *messages, buf = buf.split(b"\0")
            with self._cond:
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                self._cond.notify_all()

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float = 30,
    ) -> dict[str, Any]:
        with self._cond:
            self._next_id += 1
            mid = self._next_id
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        with self._cond:
            ok = self._cond.wait_for(
                lambda: mid in self._replies or -1 in self._replies, timeout
            )
            reply = self._replies.pop(mid, None) or self._replies.get(-1)
        if not ok or reply is None:
            raise TimeoutError(f"no reply to {method} within {timeout} s")
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send(
            "Target.attachToTarget", {"targetId": target, "flatten": True}
        )["sessionId"]
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {
                "width": WINDOW[0],
                "height": WINDOW[1],
                "deviceScaleFactor": 1,
                "mobile": False,
            },
            self.session,
        )
        self.send("Page.navigate", {"url": url}, self.session)

    def js(self, expression: str) -> Any:
        out = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True},
            self.session,
        )
        if "exceptionDetails" in out:
            raise RuntimeError(f"{expression}: {out['exceptionDetails']}")
        return out["result"].get("value")

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png"}, self.session)
        path.write_bytes(base64.b64decode(data["data"]))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        try:  # chromium's helper processes share its process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        os.close(self._cmd_w)
        self._reader.join(10)
        os.close(self._out_r)
        self._log.close()


def _high_fd(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(chromium_binary(), tmp_path / "profile", tmp_path / "chromium.log")
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def dash_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(
        n_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0"
    ) as cluster:
        yield cluster


def gated(gate: str) -> Callable[[int], int]:
    """A task that runs until ``gate`` exists (bounded, so a failure cannot hang)."""

    def hold(i: int) -> int:
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        return i

    return hold


def text(b: Browser, selector: str) -> str | None:
    query = f"document.querySelector({json.dumps(selector)})"
    return b.js(f"(e => e && e.textContent)({query})")


def page_view(b: Browser) -> dict[str, Any]:
    """What the page shows now ({} while it is still loading)."""
    view = b.js("""(() => {
        const byId = (id) => document.getElementById(id);
        if (!document.body || !byId("tasks-done")) return null;
        const rows = Array.from(document.querySelectorAll("#workers tr[data-worker]"));
        return {
            updates: Number(document.body.dataset.updates),
            origin: performance.timeOrigin,
            navigations: performance.getEntriesByType("navigation").length,
            done: byId("tasks-done").textContent,
            workers: rows.map((r) => r.dataset.worker),
            executing: rows.map((r) => r.cells[4].textContent),
            memory_used: byId("memory-total").textContent,
            processing: byId("count-processing")?.textContent,
            memory: byId("count-memory")?.textContent,
            conn: byId("conn").textContent,
        };
    })()""")
    return view or {}


def test_dashboard_needs_its_token(dash_cluster: LocalCluster) -> None:
    link = dash_cluster.dashboard_link
    assert link and link.startswith("http://127.0.0.1:") and "?token=" in link
    base, token = link.split("/status?token=")
    for path in ("/", "/status", "/api/status", "/api/status?token=wrong"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + path, timeout=30)
        assert err.value.code == 403, path
        err.value.close()
    with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=30) as r:
        assert len(json.load(r)["workers"]) == 2
    req = urllib.request.Request(
        f"{base}/status", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert b'id="task-stream"' in r.read()


def test_dashboard_in_a_browser_updates_itself(
    dash_cluster: LocalCluster, browser: Browser, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    with Client(dash_cluster, set_as_default=False) as c:
        assert c.dashboard_link == dash_cluster.dashboard_link
        before = c._info("status")["counters"]["tasks_done"]
        # Work for every panel: groups, a task stream, errors with user-chosen text
        # (that must show as text, not HTML), then tasks held back by the gate.
        kept = c.map(tasks.inc, range(100))
        kept += c.map(tasks.slow_inc, range(16), delay=0.15)
        c.gather(kept)
        evil = c.submit(tasks.fail, "<img src=x onerror=document.title='pwned'>")
        bad = [evil, *c.map(tasks.fail, range(2))]
        held = c.map(gated(str(gate)), range(12))
        try:
            finished = before + 116
            browser.open(dash_cluster.dashboard_link)
            first = wait_for(
                lambda: (
                    (v := page_view(browser)).get("done") == str(finished)
                    and v["workers"] == ["0", "1"]
                    and int(v["processing"] or 0) > 0
                    and v
                ),
                timeout=60,
                what="the page showing the finished tasks and busy workers",
            )
            assert first["navigations"] == 1 and first["updates"] >= 1
            assert first["conn"] == "live"
            assert int(first["memory"]) >= 116
            # Each task group has a bar; the erred group shows its failures.
            groups = browser.js(
                "Array.from(document.querySelectorAll('#groups .group'),"
                " g => [g.dataset.group, g.textContent])"
            )
            names = [g for g, _ in groups]
            assert {"inc", "slow_inc", "fail", "hold"} <= set(names), groups
            assert "0 + 3 erred / 3" in dict(groups)["fail"]
            # The task stream drew rectangles, one worker per row, red for errors.
            drawn = browser.js("document.getElementById('task-stream').dataset.tasks")
            assert int(drawn) >= 116
            assert (
                browser.js(
                    "document.querySelectorAll('#task-stream rect"
                    "[data-status=error]').length"
                )
                >= 1
            )
            # Errors with their tracebacks, the user's text as text.
            errors = text(browser, "#errors") or ""
            assert "ValueError: bad value" in errors and "Traceback" in errors
            assert "<img src=x onerror=" in errors
            assert browser.js("document.querySelectorAll('#errors img').length") == 0
            assert browser.js("document.title") == "zdist dashboard"
            # Heartbeats bring each worker's metrics: the held task running, memory.
            busy = wait_for(
                lambda: (
                    (v := page_view(browser))
                    and all(e.startswith("1 / ") for e in v["executing"])
                    and v
                ),
                timeout=60,
                what="heartbeat metrics on the page",
            )
            assert busy["memory_used"].endswith("iB"), busy
            shot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "dashboard.png")
            browser.screenshot(shot)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        finally:
            gate.touch()
        assert c.gather(held) == list(range(12))
        # The same page, never reloaded, catches up by itself.
        last = wait_for(
            lambda: (v := page_view(browser)).get("done") == str(finished + 12) and v,
            timeout=60,
            what="the page's done count to move without a reload",
        )
        assert last["origin"] == first["origin"] and last["navigations"] == 1
        assert last["updates"] > first["updates"]
        assert last["processing"] == "0"
        del bad, kept
