"""Same-host transfers through shared memory (zdist.worker.shm) and the worker's
private scratch directories (zdist.worker.scratch).

Cluster tests run real LocalCluster processes with security on (the default); the
module's own tests use real files in a temporary directory."""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tasks
from utils import wait_for

from zdist import Client, LocalCluster, get_worker, serialize, wait
from zdist.worker.memory import SpillBuffer
from zdist.worker.scratch import Janitor, make_local_directory
from zdist.worker.shm import ENV, MIN_SHM_BYTES, SharedMemory, ShmError

pytestmark = pytest.mark.timeout(120)

MB = 1 << 20


# ======================================================================================
# helpers run on workers (module-level: workers import this module by name)


def make_array(n: int, scale: float) -> np.ndarray:
    return np.arange(n, dtype=np.float64) * scale


def make_frame(n: int) -> Any:
    import pandas as pd

    return pd.DataFrame(
        {
            "i": np.arange(n, dtype=np.int64),
            "x": np.linspace(0.0, 1.0, n),
            "s": [f"row-{k % 97}" for k in range(n)],
        }
    )


def describe_array(x: np.ndarray, *_: Any) -> dict[str, Any]:
    """Where the consumer's copy lives, and a digest of its contents."""
    base: Any = x
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return {
        "sha": hashlib.sha256(x.tobytes()).hexdigest(),
        "writeable": bool(x.flags.writeable),
        "mapped": isinstance(base, mmap.mmap),
        "worker": get_worker().name,
    }


def held_here(key: str) -> dict[str, Any]:
    """describe_array of the value this worker holds for ``key``."""
    return describe_array(get_worker().data[key])


def sha(x: Any) -> str:
    return hashlib.sha256(bytes(x)).hexdigest()


def shm_state() -> dict[str, Any]:
    w = get_worker()
    directory = w.shm.directory
    entries = None
    mode = None
    if directory and os.path.isdir(directory):
        entries = sorted(os.listdir(directory))
        mode = stat.S_IMODE(os.stat(directory).st_mode)
    local_mode = stat.S_IMODE(os.stat(w.local_directory).st_mode)
    return {
        "name": w.name,
        "dir": directory,
        "entries": entries,
        "mode": mode,
        "local": w.local_directory,
        "local_mode": local_mode,
        "metrics": w.metrics(),
    }


def evict_all() -> int:
    data = get_worker().data
    data.evict(0)
    return len(data.slow)


def by_name(client: Client) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in client.run(shm_state).values()}


def names(client: Client) -> list[str]:
    return sorted(w["name"] for w in client.scheduler_info()["workers"].values())


@pytest.fixture(scope="module")
def shm_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(n_workers=2, threads_per_worker=1) as c:
        assert c.security is not None  # the default: every socket is CurveZMQ
        yield c


@pytest.fixture
def shm_client(shm_cluster: LocalCluster) -> Iterator[Client]:
    with Client(shm_cluster, set_as_default=False) as c:
        yield c


def require_shm() -> None:
    if not SharedMemory(root="/dev/shm").enabled:
        pytest.skip("no usable /dev/shm here")


# ======================================================================================
# between two worker processes


def test_large_numpy_array_moves_through_shared_memory(shm_client: Client) -> None:
    require_shm()
    c = shm_client
    a, b = names(c)
    before = by_name(c)
    n = 2 * MB  # 16 MiB of float64
    x = c.submit(make_array, n, 3.0, workers=[a], pure=False)
    got = c.submit(describe_array, x, workers=[b], pure=False).result(60)
    assert got["worker"] == b
    assert got["sha"] == hashlib.sha256(make_array(n, 3.0).tobytes()).hexdigest()
    assert got["mapped"]  # the consumer's array lives in the mapped file ...
    assert got["writeable"]  # ... copy-on-write, as writable as a received frame
    after = by_name(c)
    assert after[b]["metrics"]["shm_transfers"] == (
        before[b]["metrics"]["shm_transfers"] + 1
    )
    assert after[a]["metrics"]["shm_served"] == before[a]["metrics"]["shm_served"] + 1
    assert after[b]["metrics"]["shm_fallbacks"] == 0
    # The receiver unlinked the file: nothing is left in the server's directory,
    # which only its user can enter.
    assert after[a]["entries"] == []
    assert after[a]["mode"] == 0o700
    assert os.path.basename(after[a]["dir"]).startswith(f"zdist-{os.getuid()}-")
    # and the value came back whole to the client, too
    np.testing.assert_array_equal(
        c.submit(tasks.identity, x, workers=[b], pure=False).result(60),
        make_array(n, 3.0),
    )


def test_server_holds_an_array_it_served_through_the_shared_pages(
    shm_client: Client, tmp_path: Path
) -> None:
    # After the transfer both workers read the same pages: the server dropped its
    # own copy for a mapping of the file it wrote (a transfer does not double the
    # array's memory), and its value is still whole and still writable.
    require_shm()
    c = shm_client
    a, b = names(c)
    n = 2 * MB
    x = c.submit(make_array, n, 5.0, workers=[a], pure=False)
    wait([x], timeout=60)
    (before,) = c.run(held_here, x.key, workers=[a]).values()
    assert not before["mapped"]  # made on a: an ordinary array
    adopted = by_name(c)[a]["metrics"]["shm_adopted"]
    # A task of a's still waits for x (behind a gate), so a keeps its copy after b
    # has fetched one (else the broker frees it: one copy serves everyone).
    gate = tmp_path / "open"
    closed = c.submit(tasks.wait_for_path, str(gate), workers=[a], pure=False)
    later = c.submit(describe_array, x, closed, workers=[a], pure=False)
    got = c.submit(describe_array, x, workers=[b], pure=False).result(60)
    assert got["mapped"] and got["worker"] == b
    # The reply goes out before the server swaps its copy: wait for the swap.
    wait_for(
        lambda: by_name(c)[a]["metrics"]["shm_adopted"] == adopted + 1,
        what="the server to hold the value through the file",
    )
    (after,) = c.run(held_here, x.key, workers=[a]).values()
    assert after["mapped"] and after["writeable"]
    assert after["sha"] == before["sha"] == got["sha"]
    gate.touch()
    assert later.result(60) == {**after, "worker": a}


def test_large_bytes_move_through_shared_memory(shm_client: Client) -> None:
    require_shm()
    c = shm_client
    a, b = names(c)
    before = by_name(c)[b]["metrics"]["shm_transfers"]
    big = c.submit(tasks.make_bytes, 3 * MB, workers=[a], pure=False)
    assert c.submit(sha, big, workers=[b], pure=False).result(60) == sha(
        b"x" * (3 * MB)
    )
    assert by_name(c)[b]["metrics"]["shm_transfers"] == before + 1


def test_pandas_dataframe_moves_through_shared_memory(shm_client: Client) -> None:
    require_shm()
    pd = pytest.importorskip("pandas")
    c = shm_client
    a, b = names(c)
    before = by_name(c)[b]["metrics"]["shm_transfers"]
    df = c.submit(make_frame, 200_000, workers=[a], pure=False)
    back = c.submit(tasks.identity, df, workers=[b], pure=False).result(60)
    pd.testing.assert_frame_equal(back, make_frame(200_000))
    assert by_name(c)[b]["metrics"]["shm_transfers"] == before + 1


def test_small_values_still_travel_over_the_socket(shm_client: Client) -> None:
    c = shm_client
    a, b = names(c)
    before = by_name(c)
    small = c.submit(tasks.make_bytes, MIN_SHM_BYTES // 2, workers=[a], pure=False)
    assert c.submit(tasks.length, small, workers=[b], pure=False).result(60) == (
        MIN_SHM_BYTES // 2
    )
    after = by_name(c)
    assert after[a]["metrics"]["shm_served"] == before[a]["metrics"]["shm_served"]
    assert (
        after[b]["metrics"]["shm_transfers"] == (before[b]["metrics"]["shm_transfers"])
    )


def test_mapped_value_spills_and_comes_back(shm_client: Client) -> None:
    require_shm()
    c = shm_client
    a, b = names(c)
    n = MB
    x = c.submit(make_array, n, 7.0, workers=[a], pure=False)
    first = c.submit(describe_array, x, workers=[b], pure=False).result(60)
    assert first["mapped"]
    [address] = [
        addr for addr, w in c.scheduler_info()["workers"].items() if w["name"] == b
    ]
    assert c.run(evict_all, workers=[address])[address] >= 1
    again = c.submit(describe_array, x, workers=[b], pure=False).result(60)
    assert again["sha"] == first["sha"]
    assert not again["mapped"]  # read back from the spill file


def test_no_shared_memory_file_outlives_the_cluster(tmp_path: Path) -> None:
    require_shm()
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster:
        with Client(cluster, set_as_default=False) as c:
            a, b = names(c)
            xs = [
                c.submit(make_array, MB // 2, k, workers=[a], pure=False)
                for k in range(3)
            ]
            assert c.submit(tasks.length, *xs, workers=[b], pure=False).result(60) == (
                3 * MB // 2
            )
            state = by_name(c)
            assert state[b]["metrics"]["shm_transfers"] == 3
            assert state[a]["entries"] == []
            dirs = [s["dir"] for s in state.values()]
            locals_ = [s["local"] for s in state.values()]
            assert all(dirs) and all(os.path.isdir(d) for d in dirs)
    # LocalCluster.close() kills its workers: their janitors clean up.
    wait_for(
        lambda: not any(os.path.exists(p) for p in [*dirs, *locals_]),
        30,
        what="the workers' shared-memory and local directories to go",
    )


def test_receiver_that_cannot_open_the_file_falls_back_to_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers whose transfer directories are different places on one device:
    what a receiver in another /dev/shm namespace sees (the server's path does not
    exist for it). It must get the value over the network."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setenv(ENV, str(tmp_path / "a"))
    with LocalCluster(n_workers=1, threads_per_worker=1) as cluster:
        monkeypatch.setenv(ENV, str(tmp_path / "b"))
        cluster.scale(2)
        cluster.wait_for_workers(2, timeout=60)
        with Client(cluster, set_as_default=False) as c:
            server, receiver = "0", "1"
            assert names(c) == [server, receiver]
            x = c.submit(make_array, MB, 5.0, workers=[server], pure=False)
            got = c.submit(describe_array, x, workers=[receiver], pure=False)
            assert (
                got.result(60)["sha"]
                == hashlib.sha256(make_array(MB, 5.0).tobytes()).hexdigest()
            )
            assert not got.result()["mapped"]
            state = by_name(c)
            assert state[server]["metrics"]["shm_served"] == 1  # it tried ...
            assert state[receiver]["metrics"]["shm_fallbacks"] == 1  # ... in vain
            assert state[receiver]["metrics"]["shm_transfers"] == 0
            # From then on that peer is asked for bytes only.
            y = c.submit(make_array, MB, 6.0, workers=[server], pure=False)
            assert c.submit(describe_array, y, workers=[receiver]).result(60)["sha"]
            state = by_name(c)
            assert state[server]["metrics"]["shm_served"] == 1
            assert state[receiver]["metrics"]["shm_fallbacks"] == 1
            server_dir = state[server]["dir"]
            assert server_dir.startswith(str(tmp_path / "a"))
    # The unclaimed file went with its server.
    wait_for(lambda: not os.path.exists(server_dir), 30, what="the server's directory")


def test_server_that_cannot_write_sends_the_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "shm"
    root.mkdir()
    monkeypatch.setenv(ENV, str(root))
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster:
        with Client(cluster, set_as_default=False) as c:
            a, b = names(c)
            shutil.rmtree(root)  # as if /dev/shm were gone (or full)
            x = c.submit(make_array, MB, 2.0, workers=[a], pure=False)
            small = c.submit(tasks.make_bytes, 1000, workers=[a], pure=False)
            got = c.submit(describe_array, x, small, workers=[b], pure=False)
            assert (
                got.result(60)["sha"]
                == hashlib.sha256(make_array(MB, 2.0).tobytes()).hexdigest()
            )
            state = by_name(c)
            assert state[a]["metrics"]["shm_served"] == 0
            assert state[b]["metrics"]["shm_transfers"] == 0
            assert state[b]["metrics"]["shm_fallbacks"] == 0
            logs = [line for lines in c.get_worker_logs().values() for _, line in lines]
            assert any("cannot write" in line for line in logs)  # it tried


def test_shared_memory_off_uses_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "off")
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster:
        with Client(cluster, set_as_default=False) as c:
            a, b = names(c)
            big = c.submit(tasks.make_bytes, 2 * MB, workers=[a], pure=False)
            assert c.submit(tasks.length, big, workers=[b], pure=False).result(60) == (
                2 * MB
            )
            state = by_name(c)
            assert state[a]["dir"] is None
            assert state[a]["metrics"]["shm_served"] == 0
            assert state[b]["metrics"]["shm_transfers"] == 0


# ======================================================================================
# the worker's local directory


def test_worker_local_directory_is_private_and_removed_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "scratch"  # made by the worker, as --local-directory does
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmpdir"))
    with LocalCluster(
        n_workers=2, threads_per_worker=1, local_directory=str(scratch)
    ) as cluster:
        with Client(cluster, set_as_default=False) as c:
            state = by_name(c)
            locals_ = {name: s["local"] for name, s in state.items()}
            for s in state.values():
                assert s["local_mode"] == 0o700
                assert os.path.dirname(s["local"]) == str(scratch)
                assert os.path.basename(s["local"]).startswith("zdist-worker-")
            assert len(set(locals_.values())) == 2  # one each
            cluster.scale(1)  # a graceful exit: the worker removes its own
            assert not os.path.exists(locals_["1"])
            assert os.path.isdir(locals_["0"])
    wait_for(lambda: not os.path.exists(locals_["0"]), 30, what="local directory")
    assert scratch.is_dir()  # the worker removes only what it made


def test_default_local_directory_is_under_tmpdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False) as cluster:
        with Client(cluster, set_as_default=False) as c:
            [state] = c.run(shm_state).values()
            assert os.path.dirname(state["local"]) == str(tmp_path)
            assert state["local_mode"] == 0o700
            assert c.submit(tasks.inc, 1).result(60) == 2
    assert not os.path.exists(state["local"])
    assert list(tmp_path.iterdir()) == []


def test_janitor_removes_directories_of_a_killed_process(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from zdist.worker.scratch import Janitor, make_local_directory\n"
        "d = make_local_directory(sys.argv[1])\n"
        "open(d + '/spilled', 'w').write('x')\n"
        "j = Janitor([d])\n"
        "print(d, flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        directory = proc.stdout.readline().strip()
        assert os.path.isfile(os.path.join(directory, "spilled"))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        wait_for(lambda: not os.path.exists(directory), 30, what="the janitor")
        assert list(tmp_path.iterdir()) == []
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_janitor_close_removes_now(tmp_path: Path) -> None:
    d = make_local_directory(str(tmp_path))
    (Path(d) / "f").write_text("x")
    j = Janitor([d])
    assert j.proc is not None and j.proc.poll() is None
    j.close()
    assert not os.path.exists(d)
    assert j.proc.returncode == 0


# ======================================================================================
# the module, on real files


@pytest.fixture
def shm(tmp_path: Path) -> Iterator[SharedMemory]:
    s = SharedMemory(root=str(tmp_path))
    assert s.enabled
    assert s.prepare() is not None
    yield s
    s.close()


def _write_array(shm: SharedMemory, n: int = 300_000) -> tuple[str, list, np.ndarray]:
    x = np.arange(n, dtype=np.float64)
    path, layout = shm.write(serialize.dumps(x))
    return path, layout, x


def test_written_file_is_private_and_claimed_once(shm: SharedMemory) -> None:
    path, layout, x = _write_array(shm)
    assert shm.directory is not None
    assert stat.S_IMODE(os.stat(shm.directory).st_mode) == 0o700
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    assert all(offset % mmap.PAGESIZE == 0 for offset, _ in layout)
    y = serialize.loads(shm.read(path, layout))
    np.testing.assert_array_equal(y, x)
    assert not os.path.exists(path)  # unlinked at once
    with pytest.raises(ShmError, match="cannot open"):
        shm.read(path, layout)


def test_mapped_value_spills_in_process(shm: SharedMemory, tmp_path: Path) -> None:
    path, layout, x = _write_array(shm)
    buf = SpillBuffer(str(tmp_path / "local"), None)
    try:
        frames = shm.read(path, layout)
        buf.put("k", serialize.loads(frames), serialize.nbytes(frames))
        del frames
        assert buf.evict(0) == 1 and "k" in buf.slow
        np.testing.assert_array_equal(buf["k"], x)
    finally:
        buf.close()


@pytest.mark.parametrize("tamper", ["mode", "symlink", "fifo", "short", "gone"])
def test_read_refuses_anything_but_a_private_regular_file(
    shm: SharedMemory, tmp_path: Path, tamper: str
) -> None:
    path, layout, _ = _write_array(shm)
    if tamper == "mode":
        os.chmod(path, 0o640)
    elif tamper == "symlink":
        target = tmp_path / "elsewhere"
        os.rename(path, target)
        os.symlink(target, path)
    elif tamper == "fifo":
        os.unlink(path)
        os.mkfifo(path, 0o600)
    elif tamper == "short":
        os.truncate(path, layout[-1][0])
    elif tamper == "gone":
        os.unlink(path)
    with pytest.raises(ShmError):
        shm.read(path, layout)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to chown")
def test_read_refuses_another_users_file(shm: SharedMemory) -> None:
    path, layout, _ = _write_array(shm)
    os.chown(path, 65534, -1)
    with pytest.raises(ShmError, match="not private"):
        shm.read(path, layout)
    assert os.path.exists(path)


@pytest.mark.parametrize(
    "where", ["outside", "dotdot", "other-user-dir", "not-hex", "relative"]
)
def test_read_refuses_paths_outside_transfer_directories(
    shm: SharedMemory, tmp_path: Path, where: str
) -> None:
    victim = tmp_path / "precious"
    victim.write_bytes(b"\0" * 8192)
    assert shm.directory is not None
    d = os.path.basename(shm.directory)
    path = {
        "outside": str(victim),
        "dotdot": f"{shm.directory}/../precious",
        "other-user-dir": f"{tmp_path}/zdist-{os.getuid() + 1}-x-1-abc/1",
        "not-hex": f"{shm.directory}/precious",
        "relative": f"{d}/1",
    }[where]
    with pytest.raises(ShmError):
        shm.read(path, [[0, 4096]])
    assert victim.exists()  # never unlinked


@pytest.mark.parametrize(
    "layout", [[], [[0]], [[-1, 5]], [[0, "5"]], "x", [[0, True]], None]
)
def test_read_refuses_malformed_layouts(shm: SharedMemory, layout: Any) -> None:
    path, _, _ = _write_array(shm)
    with pytest.raises(ShmError):
        shm.read(path, layout)
    assert os.path.exists(path)  # left for the sweep


def test_sweep_removes_unclaimed_files(shm: SharedMemory) -> None:
    shm.ttl = 0.0
    path, _, _ = _write_array(shm)
    claimed, layout, _ = _write_array(shm)
    shm.read(claimed, layout)
    assert shm.pending == 2
    assert shm.sweep(time.monotonic()) == 1
    assert not os.path.exists(path)
    assert shm.pending == 0


def test_close_removes_the_directory(tmp_path: Path) -> None:
    s = SharedMemory(root=str(tmp_path))
    s.prepare()
    _write_array(s)
    s.close()
    assert list(tmp_path.iterdir()) == []


def test_directories_of_dead_workers_are_removed(tmp_path: Path) -> None:
    first = SharedMemory(root=str(tmp_path))
    assert first.prepare() is not None
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    pid = int(dead.stdout)
    assert first.directory is not None
    name = os.path.basename(first.directory)
    stale = str(tmp_path / name.replace(f"-{os.getpid()}-", f"-{pid}-"))
    os.rename(first.directory, stale)
    (Path(stale) / "1").write_bytes(b"unclaimed")
    alive = tmp_path / name.replace(f"-{os.getpid()}-", f"-{os.getppid()}-")
    alive.mkdir(mode=0o700)
    second = SharedMemory(root=str(tmp_path))
    second.prepare()
    try:
        assert not os.path.exists(stale)
        assert alive.is_dir()  # its process lives: not ours to remove
    finally:
        second.close()
        alive.rmdir()


def test_host_token_differs_between_devices(tmp_path: Path) -> None:
    here = SharedMemory(root=str(tmp_path))
    off = SharedMemory(root="")
    assert here.token and not off.enabled
    assert not here.accepts("") and not here.accepts(here.token + "x")
    assert here.accepts(here.token)
    if (
        os.path.isdir("/dev/shm")
        and os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev
    ):
        assert SharedMemory(root="/dev/shm").token != here.token
