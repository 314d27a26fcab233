"""scripts/pbs-job.sh and scripts/slurm-job.sh run for real.

pbs-job.sh goes through the Torque-style qsub of slurm-wlm-torque (which sets no
PBS_NODEFILE, so one local worker runs), slurm-job.sh through sbatch; the per-node
launch of pbs-job.sh is run directly with a PBS_NODEFILE, once listing this host twice
(a local worker) and once listing two other names reached through a stand-in ssh that
runs the command here.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_util import require_slurm
from utils import wait_for

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
PBS_JOB = ROOT / "scripts" / "pbs-job.sh"
SLURM_JOB = ROOT / "scripts" / "slurm-job.sh"
HOST = socket.gethostname().split(".")[0]

# The user's script: connects through the exported scheduler file, submits work and
# checks the answer.
USER_SCRIPT = """\
import os, stat, sys
from zdist import Client

def square(x):
    return x * x

path = os.environ["ZDIST_SCHEDULER_FILE"]
with Client(scheduler_file=path) as client:
    workers = client.scheduler_info()["workers"].values()
    names = sorted(w["name"] for w in workers)
    local_dirs = sorted(w["local_directory"] for w in workers)
    total = sum(client.gather(client.map(square, range(10))))
print("WORKERS", " ".join(names))
print("ANSWER", total, "OK" if total == 285 else "WRONG")
print("MODE", oct(stat.S_IMODE(os.stat(path).st_mode)))
print("ARGS", " ".join(sys.argv[1:]))
print("LOCAL_DIRS", " ".join(local_dirs))
sys.exit(int(os.environ.get("USER_EXIT", "0")))
"""


def write_user_script(directory: Path) -> Path:
    path = directory / "analysis.py"
    path.write_text(USER_SCRIPT)
    return path


def job_env(**extra: str) -> dict[str, str]:
    # Nothing of an outer job or of the developer's settings leaks in.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PBS_", "ZDIST_"))}
    env["ZDIST_PYTHON"] = sys.executable
    env.update(extra)
    return env


def zdist_processes(directory: Path) -> list[tuple[int, str]]:
    """zbroker/zworker processes whose scheduler file lies under ``directory``."""
    marker = f"ZDIST_SCHEDULER_FILE={directory}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                zombie = f.read().rsplit(") ", 1)[1].startswith("Z")
        except OSError:
            continue
        ours = any(e.startswith(marker) for e in env) or str(directory) in cmd
        if ours and "zdist." in cmd and not zombie:
            found.append((int(entry), cmd))
    return found


def in_queue(job_id: str) -> bool:
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30
    )
    return job_id in out.stdout.split()


def assert_ran(output: str, workers: list[str], args: str = "") -> None:
    assert f"WORKERS {' '.join(workers)}\n" in output, output
    assert "ANSWER 285 OK\n" in output, output
    assert "MODE 0o600\n" in output, output
    assert f"ARGS {args}\n" in output, output


def assert_cleaned_up(directory: Path) -> None:
    wait_for(lambda: not zdist_processes(directory), 30, 0.2, "zbroker/zworker to exit")
    assert not list(directory.glob(".zdist-job-*")), "scheduler directory left behind"


@pytest.mark.slurm
@pytest.mark.slow
def test_pbs_job_script_through_torque_qsub(tmp_path: Path) -> None:
    require_slurm(torque=True)
    write_user_script(tmp_path)
    out = subprocess.run(
        ["qsub", str(PBS_JOB), "analysis.py", "one", "two"],
        cwd=tmp_path,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    job_id = out.stdout.strip()
    assert job_id.isdigit(), out.stdout
    wait_for(lambda: not in_queue(job_id), 90, 0.2, f"job {job_id} to finish")
    # Torque's qsub names the output files after the script.
    stdout = (tmp_path / f"pbs-job.sh.o{job_id}").read_text()
    stderr = (tmp_path / f"pbs-job.sh.e{job_id}").read_text()
    assert_ran(stdout, [f"zworker-{HOST}"], "one two")
    assert "Traceback" not in stderr, stderr
    assert_cleaned_up(tmp_path)


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_job_script_through_sbatch(tmp_path: Path) -> None:
    require_slurm()
    write_user_script(tmp_path)
    out = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "-o",
            str(tmp_path / "job-%j.out"),
            str(SLURM_JOB),
            "analysis.py",
            "three",
        ],
        cwd=tmp_path,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    wait_for(lambda: not in_queue(job_id), 90, 0.2, f"job {job_id} to finish")
    output = (tmp_path / f"job-{job_id}.out").read_text()
    assert_ran(output, [f"zworker-{HOST}"], "three")
    assert "Traceback" not in output, output
    state = subprocess.run(
        ["scontrol", "show", "job", job_id],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    if state:  # finished jobs stay visible for MinJobAge (300 s)
        assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, state
    assert_cleaned_up(tmp_path)


@pytest.mark.slow
def test_pbs_job_starts_one_worker_per_node_of_the_nodefile(tmp_path: Path) -> None:
    write_user_script(tmp_path)
    nodefile = tmp_path / "nodefile"
    nodefile.write_text(f"{HOST}\n{HOST}\n")  # PBS lists a node once per core
    jobfs = tmp_path / "jobfs"  # Gadi's node-local disk; workers spill there
    jobfs.mkdir()
    out = subprocess.run(
        ["bash", str(PBS_JOB), "analysis.py"],
        cwd=tmp_path,
        env=job_env(
            PBS_NODEFILE=str(nodefile),
            PBS_JOBID="4242.testserver",
            PBS_O_WORKDIR=str(tmp_path),
            PBS_JOBFS=str(jobfs),
        ),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert_ran(out.stdout, [f"zworker-{HOST}"])
    assert f"LOCAL_DIRS {jobfs}" in out.stdout, out.stdout
    assert "1 node(s) started" in out.stderr
    assert_cleaned_up(tmp_path)


@pytest.mark.slow
def test_pbs_job_reaches_other_nodes_through_ssh(tmp_path: Path) -> None:
    # A stand-in ssh that runs the remote command here and logs the node it was for:
    # the node loop, the remote command line and the shutdown are the real ones.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ssh = bin_dir / "ssh"
    ssh.write_text(
        "#!/usr/bin/env bash\n"
        'while [ "$1" = -o ]; do shift 2; done\n'
        'echo "$1" >> "$SSH_LOG"\n'
        "shift\n"
        'exec bash -c "$*"\n'
    )
    ssh.chmod(stat.S_IRWXU)
    write_user_script(tmp_path)
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("node-a\nnode-a\nnode-b.cluster\nnode-b.cluster\n")
    log = tmp_path / "ssh.log"
    env = job_env(
        PBS_NODEFILE=str(nodefile),
        PBS_JOBID="4343.testserver",
        PBS_O_WORKDIR=str(tmp_path),
        SSH_LOG=str(log),
        USER_EXIT="3",
        PATH=f"{bin_dir}:{os.environ['PATH']}",
    )
    out = subprocess.run(
        ["bash", str(PBS_JOB), "analysis.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert out.returncode == 3, out.stdout + out.stderr  # the script's own status
    assert_ran(out.stdout, ["zworker-node-a", "zworker-node-b"])
    assert log.read_text().split() == ["node-a", "node-b.cluster"]
    assert_cleaned_up(tmp_path)


def test_pbs_job_without_a_script_says_how_to_use_it(tmp_path: Path) -> None:
    out = subprocess.run(
        ["bash", str(PBS_JOB)],
        cwd=tmp_path,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert re.search(r"usage: pbs-job.sh SCRIPT.py", out.stderr), out.stderr
    assert list(tmp_path.iterdir()) == []
