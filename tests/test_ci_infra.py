"""The CI machine's batch system works: real Slurm, and Torque-style qsub on top of it.

These guard what the Slurm/PBS end-to-end tests rely on, so that a broken
scripts/ci/start-slurm.sh shows up here rather than as a confusing cluster failure.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from slurm_util import require_slurm

# The first job after slurmctld starts can wait ~3 s for a scheduling pass; jobs then
# start within 0-1 s. A loaded 2-core CI machine needs headroom beyond that.
JOB_START_TIMEOUT = 30.0


def poll_until(
    predicate: Callable[[], bool], timeout: float, what: str, job: str
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            state = subprocess.run(
                ["scontrol", "show", "job", job],
                capture_output=True,
                text=True,
                check=False,
            )
            pytest.fail(
                f"{what} within {timeout}s; scontrol show job {job}:\n"
                f"{state.stdout}{state.stderr}"
            )
        time.sleep(0.05)


def cancel(job: str) -> None:
    # Harmless for a finished job; keeps a failed test from leaving a job behind.
    subprocess.run(["scancel", job], capture_output=True, check=False)


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


@pytest.mark.slurm
@pytest.mark.timeout(60)
def test_sbatch_job_runs_and_writes_its_output(tmp_path: Path) -> None:
    require_slurm()
    output = tmp_path / "job.out"
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--job-name=zdist-ci-sbatch",
            f"--output={output}",
            f"--chdir={tmp_path}",
            "--time=2",
            "--wrap",
            'echo "zdist-ci ran job $SLURM_JOB_ID"',
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    assert job.isdigit(), submitted.stdout
    try:
        expected = f"zdist-ci ran job {job}\n"
        poll_until(
            lambda: read_text(output) == expected,
            JOB_START_TIMEOUT,
            f"job {job} did not write {expected!r} to {output}",
            job,
        )
    finally:
        cancel(job)


@pytest.mark.slurm
@pytest.mark.timeout(60)
def test_torque_qsub_runs_a_pbs_script(tmp_path: Path) -> None:
    require_slurm(torque=True)
    marker = tmp_path / "marker"
    script = tmp_path / "job.pbs"
    script.write_text(
        "#!/bin/bash\n"
        "#PBS -N x\n"
        "#PBS -l nodes=1:ppn=1\n"
        "#PBS -l walltime=00:02:00\n"
        # Written whole, then renamed, so the test never reads half a line.
        f'echo "$SLURM_JOB_NAME $SLURM_JOB_ID" > {marker}.tmp\n'
        f"mv {marker}.tmp {marker}\n"
    )
    # The Torque wrapper ignores `#PBS -o/-e` lines in the script and writes
    # job.pbs.o<id>/job.pbs.e<id> into qsub's working directory (`qsub -o FILE` works).
    submitted = subprocess.run(
        ["qsub", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert submitted.returncode == 0, submitted.stderr
    # Torque's qsub prints the bare job id (PBS Pro would print "<id>.<server>").
    job = submitted.stdout.strip()
    assert re.fullmatch(r"\d+", job), submitted.stdout
    try:
        poll_until(
            marker.exists,
            JOB_START_TIMEOUT,
            f"PBS job {job} did not run",
            job,
        )
        # `#PBS -N x` named the job; the id the job sees is the one qsub printed.
        assert marker.read_text() == f"x {job}\n"
    finally:
        cancel(job)
