"""Smoke test of the benchmark (scripts/bench.py): every zdist row runs and checks
its results, at a tiny size.

No timing is asserted (issue 6: timings belong in the benchmark, never in a test);
only that each row exists, holds positive numbers and was checked, and that the
run leaves no process behind.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench.py"

# Every row a zdist run produces.
TIMED_ROWS = [
    "W1",
    "W1-secoff",
    "W1-floor",
    "W1-floor-door",
    "W1-secon",
    "W2",
    "W2-secon",
    "W2-secoff",
    "W1-tcp-secon",
    "W1-tcp-secoff",
    "W2-tcp-secon",
    "W2-tcp-secoff",
    "W3",
    "W4",
    "W5",
    "W6",
    "W7",
    "W8",
    "W8-rate",
    "W9-rate",
    "W9-trip",
]
# Memory growth can honestly be 0 at this size: the allocator may reuse memory
# freed by earlier workloads. So can an idle broker's CPU share over 1 s.
MEMORY_ROWS = ["W5-mem", "W8-mem", "W9-idle"]
# Derived percentages: negative when security on happened to run faster.
SECURITY_COST_ROWS = ["SEC-W1", "SEC-W2", "SEC-TCP-W1", "SEC-TCP-W2"]
ALL_ROWS = TIMED_ROWS + MEMORY_ROWS + SECURITY_COST_ROWS


def run_bench(
    tmp_path: Path, timeout: float, *extra: str, backends: str = "zdist"
) -> tuple[int, str, dict]:
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    cmd = [
        sys.executable,
        str(BENCH),
        "--quick",
        "--tiny",
        *extra,
        "--backends",
        backends,
        "--json",
        str(out),
        "--markdown",
        str(md),
    ]
    # A session of its own, so on timeout the whole tree (broker, workers) goes.
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"bench.py did not finish in {timeout} s:\n{output[-6000:]}")
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc["_markdown"] = md.read_text() if md.exists() else ""
    return proc.returncode, output, doc


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_quick_tiny_runs_every_zdist_row(tmp_path: Path) -> None:
    pytest.importorskip("numpy")  # W5's arrays
    returncode, output, doc = run_bench(tmp_path, timeout=270)
    tail = output[-6000:]

    assert returncode == 0, tail
    assert doc.get("errors") == {}, tail
    assert doc["leftover_processes"] == [], tail
    assert doc["backends"] == ["zdist"]
    assert doc["machine"]["cores"] >= 1
    assert doc["machine"]["python"]

    rows = doc["results"]["zdist"]
    assert [r for r in ALL_ROWS if r not in rows] == [], tail
    for name in ALL_ROWS:
        row = rows[name]
        assert row["checked"] is True, name
        assert row["values"], name
        assert all(math.isfinite(v) for v in row["values"]), (name, row)
    for name in TIMED_ROWS:
        assert all(v > 0 for v in rows[name]["values"]), (name, rows[name])
        assert rows[name]["median"] > 0 and rows[name]["best"] > 0, name
    for name in MEMORY_ROWS:
        assert all(v >= 0 for v in rows[name]["values"]), (name, rows[name])
    # W5 holds 4 arrays alive on the workers: growth must show at least part of them.
    assert rows["W5-mem"]["median"] > 0
    # W8 ran the graph the tiny size asks for, once.
    assert rows["W8"]["extra"]["tasks"][0] > 1_000
    assert len(rows["W8"]["values"]) == 1

    assert "W9" not in doc["not_implemented"]

    table = {r["row"]: r for r in doc["table"]}
    assert set(TIMED_ROWS + MEMORY_ROWS) <= set(table)
    assert table["W1"]["zdist_median"] == rows["W1"]["median"]
    assert "| W1 latency |" in doc["_markdown"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_pairs_w1_with_ppe(tmp_path: Path) -> None:
    """The paired W1 ratio against ProcessPoolExecutor (context for the 1.5x target)."""
    returncode, output, doc = run_bench(
        tmp_path, 270, "--only", "W1", "--no-security-rows", backends="zdist,ppe"
    )
    tail = output[-6000:]
    assert returncode == 0, tail
    assert doc.get("errors") == {}, tail
    assert doc["leftover_processes"] == [], tail
    row = doc["results"]["zdist"]["W1-vs-ppe"]
    assert row["checked"] is True
    assert len(row["values"]) == 10
    assert all(math.isfinite(v) and v > 0 for v in row["values"]), row
    assert "| W1 zdist/ppe, paired samples (context) |" in doc["_markdown"]
