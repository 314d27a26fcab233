"""PBSCluster and SLURMCluster: job scripts, and real jobs on the CI machine's Slurm.

The end-to-end tests submit real jobs to the single-node Slurm that .ci/run starts
(scripts/ci/start-slurm.sh; it advertises 8 CPUs) and, for PBSCluster, through the
Torque-style qsub/qstat/qdel of slurm-wlm-torque. Other test sessions may share that
Slurm, so every check looks only at this test's own job ids and processes.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from slurm_util import require_ib0, require_slurm
from utils import wait_for

from zdist import Client, PBSCluster, SLURMCluster
from zdist.client.jobqueue import MAX_CONSECUTIVE_FAILURES
from zdist.client.jobs import JobError, JobState

pytestmark = pytest.mark.timeout(120)

POLL = 0.5  # queue polls in tests; the default (5 s) is kinder to a real PBS server

# The seed tutorial's PBSCluster call (Gadi), with only the import changed.
SEED_PYTHON = "/scratch/vp91/Training-Venv/parallel_python/bin/python3"
SEED_SCRIPT = """\
#!/usr/bin/env bash

#PBS -N zworker
#PBS -l walltime=00:20:00
#PBS -q normal
#PBS -P vp91
#PBS -l ncpus=48
#PBS -l mem=192GB

module load python3/3.11.0
module load cmake/3.16.2
source /scratch/abc/Training-Venv/parallel_python/bin/activate

/scratch/vp91/Training-Venv/parallel_python/bin/python3 -m zdist.worker \
--scheduler-file {scheduler_file} \
--nthreads 6 --nworkers 8 --memory-limit 24000000000 \
--name zworker-${{PBS_JOBID:-$SLURM_JOB_ID}} --death-timeout 60 --lifetime 960s \
--local-directory $TMPDIR --interface ib0
"""


# ---- task functions (workers import this module: tests/ is on their PYTHONPATH)


def slow_inc_name(x: int, delay: float) -> tuple[int, str]:
    from zdist import get_worker

    time.sleep(delay)
    return x + 1, get_worker().name


def worker_tmpdir(x: int = 0) -> str:
    return os.environ.get("TMPDIR", "")


# ---- helpers ------------------------------------------------------------------------


def queue_ids() -> set[str]:
    """Ids of jobs that Slurm lists as pending or running (any user, any session)."""
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def job_processes(job_ids: Iterable[str]) -> list[tuple[int, str]]:
    """(pid, cmdline) of zdist.worker processes that run inside the given jobs."""
    ids = {str(j) for j in job_ids}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(
                    kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv
                )
            with open(f"/proc/{entry}/stat") as f:
                zombie = f.read().rsplit(") ", 1)[1].startswith("Z")
        except OSError:
            continue
        job = env.get(b"SLURM_JOB_ID", b"").decode()
        if "zdist.worker" in cmd and job in ids and not zombie:
            found.append((int(entry), cmd))
    return found


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return not f.read().rsplit(") ", 1)[1].startswith("Z")
    except OSError:
        return False


def secrets_of(scheduler_file: str) -> list[str]:
    with open(scheduler_file) as f:
        sec = json.load(f)["security"]
    keys = [
        sec[k]
        for k in ("server_public", "server_secret", "member_public", "member_secret")
    ]
    assert all(len(k) == 40 for k in keys)
    return keys


def assert_all_gone(ids: Iterable[str], timeout: float = 30) -> None:
    ids = set(ids)
    wait_for(lambda: not (ids & queue_ids()), timeout, 0.2, f"jobs {ids} to leave")
    wait_for(lambda: not job_processes(ids), timeout, 0.2, "worker processes to exit")


def slurm(**kwargs: object) -> SLURMCluster:
    kwargs = {
        "cores": 1,
        "memory": "500MB",
        "processes": 1,
        "walltime": "00:05:00",
        "poll_interval": POLL,
        **kwargs,
    }
    return SLURMCluster(**kwargs)  # type: ignore[arg-type]


# ---- job scripts (no batch system needed) --------------------------------------------


def test_seed_pbs_cluster_gives_the_gadi_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ib0 = require_ib0()
    monkeypatch.setenv("HOME", str(tmp_path))  # the default private dir is under ~
    monkeypatch.setenv("DASK_PYTHON", SEED_PYTHON)
    # --- the seed, verbatim from here (import changed) ---
    extra = ["-q normal", "-P vp91", "-l ncpus=48", "-l mem=192GB"]
    setup_commands = [
        "module load python3/3.11.0",
        "module load cmake/3.16.2",
        "source /scratch/abc/Training-Venv/parallel_python/bin/activate",
    ]
    cluster = PBSCluster(
        walltime="00:20:00",
        cores=48,
        memory="192GB",
        shebang="#!/usr/bin/env bash",
        job_extra_directives=extra,
        local_directory="$TMPDIR",
        job_directives_skip=["select"],
        interface="ib0",
        job_script_prologue=setup_commands,
        python=os.environ["DASK_PYTHON"],
    )
    # --- end of the seed ---
    with cluster:
        script = cluster.job_script()
        sched = Path(cluster.scheduler_file)
        assert script == SEED_SCRIPT.format(scheduler_file=sched)
        assert "select" not in script
        # The broker listens on ib0's address, as the workers' --interface ib0.
        assert cluster.scheduler_address.startswith(f"tcp://{ib0}:")
        # Keys live only in a 0600 file in a 0700 directory under ~/.zdist.
        assert sched.parent.parent == tmp_path / ".zdist" / "clusters"
        assert stat.S_IMODE(sched.stat().st_mode) == 0o600
        assert stat.S_IMODE(sched.parent.stat().st_mode) == 0o700
        for key in secrets_of(str(sched)):
            assert key not in script
        assert cluster.status.value == "running"
    assert cluster.status.value == "closed"
    assert not sched.parent.exists()  # the private directory is removed


def test_bad_arguments_fail_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="job_name"):
        PBSCluster(
            cores=1, memory="1GB", job_name="bad name", shared_temp_directory=tmp_path
        )
    with pytest.raises(ValueError, match="resource_spec is PBS syntax"):
        SLURMCluster(
            cores=1,
            memory="1GB",
            resource_spec="nodes=1:ppn=1",
            shared_temp_directory=tmp_path,
        )
    assert list(tmp_path.iterdir()) == []


def test_missing_qsub_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with PBSCluster(cores=1, memory="1GB", shared_temp_directory=tmp_path) as cluster:
        with pytest.raises(JobError, match="qsub not found on PATH"):
            cluster.scale(jobs=1)
        assert cluster.jobs == {}


def test_broker_address_follows_interface_and_scheduler_options(
    tmp_path: Path,
) -> None:
    ib0 = require_ib0()
    # The workers' interface (lo) and the broker's (ib0) may differ, as on clusters
    # whose login and compute nodes name their fast network differently.
    with SLURMCluster(
        cores=1,
        memory="1GB",
        interface="lo",
        scheduler_options={"interface": "ib0"},
        shared_temp_directory=tmp_path,
    ) as cluster:
        assert cluster.scheduler_address.startswith(f"tcp://{ib0}:")
        assert "--interface lo" in cluster.job_script()
    with SLURMCluster(
        cores=1,
        memory="1GB",
        scheduler_options={"host": "127.0.0.1"},
        shared_temp_directory=tmp_path,
    ) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        assert "--interface" not in cluster.job_script()
    with pytest.raises(TypeError, match="scheduler_options supports"):
        SLURMCluster(
            cores=1,
            memory="1GB",
            scheduler_options={"dashboard": 1},
            shared_temp_directory=tmp_path,
        )
    assert list(tmp_path.iterdir()) == []


def test_world_writable_directory_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "open"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ValueError, match="world-writable without the sticky bit"):
        SLURMCluster(cores=1, memory="1GB", shared_temp_directory=shared)


# ---- real Slurm ----------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_scale_two_jobs_run_tasks_and_close(tmp_path: Path) -> None:
    require_slurm()
    with slurm(shared_temp_directory=tmp_path) as cluster:
        broker_pid = cluster._res.broker.pid
        keys = secrets_of(cluster.scheduler_file)
        cluster.scale(jobs=2)
        ids = cluster.job_ids
        assert len(ids) == 2
        wait_for(lambda: set(ids) <= queue_ids(), 30, 0.2, "jobs in squeue")
        states = subprocess.run(
            ["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        cluster.wait_for_workers(2, timeout=60)
        running = subprocess.run(
            ["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
        assert dict(zip(running[::2], running[1::2], strict=True)) == {
            i: "RUNNING" for i in ids
        }, (states, running)
        with Client(cluster) as client:
            workers = client.scheduler_info()["workers"].values()
            assert sorted(w["name"] for w in workers) == sorted(
                f"zworker-{i}" for i in ids
            )
            futures = client.map(slow_inc_name, range(20), delay=0.05)
            results = client.gather(futures)
            assert [r for r, _ in results] == list(range(1, 21))
            assert {n for _, n in results} <= {f"zworker-{i}" for i in ids}
        wait_for(
            lambda: all(j.state is JobState.connected for j in cluster.jobs.values()),
            10,
            0.1,
            "both jobs seen connected",
        )
        # No secret in the script, the submitted command line, or any job process.
        procs = job_processes(ids)
        assert procs
        text = [
            cluster.job_script(),
            Path(cluster.spec.scheduler_file).parent.joinpath("zworker.sh").read_text(),
        ]
        text += [" ".join(j.submit_argv) for j in cluster.jobs.values()]
        text += [cmd for _, cmd in procs]
        for key in keys:
            assert not any(key in t for t in text)
    assert cluster.status.value == "closed"
    assert not (set(ids) & queue_ids())  # close() waits for the queue to let go
    assert_all_gone(ids)
    wait_for(lambda: not pid_alive(broker_pid), 10, 0.1, "the broker to exit")


@pytest.mark.slurm
@pytest.mark.slow
def test_pbs_cluster_through_torque_qsub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_slurm(torque=True)
    ib0 = require_ib0()
    node_tmp = tmp_path / "node-tmp"
    node_tmp.mkdir()
    # Jobs inherit this environment: "$TMPDIR" must reach the job unquoted and expand.
    monkeypatch.setenv("TMPDIR", str(node_tmp))
    with PBSCluster(
        cores=1,
        memory="500MB",
        processes=1,
        resource_spec="nodes=1:ppn=1",
        walltime="00:05:00",
        local_directory="$TMPDIR",
        interface="ib0",
        shared_temp_directory=tmp_path,
        poll_interval=POLL,
    ) as cluster:
        script = cluster.job_script()
        assert "#PBS -l nodes=1:ppn=1\n" in script
        assert "--local-directory $TMPDIR " in script
        cluster.scale(jobs=1)
        [job_id] = cluster.job_ids
        assert job_id.isdigit()  # Torque-on-Slurm prints a bare number
        cluster.wait_for_workers(1, timeout=60)
        with Client(cluster) as client:
            [worker] = client.scheduler_info()["workers"].items()
            address, info = worker
            assert info["name"] == f"zworker-{job_id}"
            assert address.startswith(f"tcp://{ib0}:")  # --interface ib0
            assert info["local_directory"].startswith(str(node_tmp))
            assert client.submit(slow_inc_name, 41, 0.0).result(timeout=30) == (
                42,
                f"zworker-{job_id}",
            )
        assert cluster.jobs[job_id].state is JobState.connected
    assert cluster.job_history[-1].state is JobState.cancelled
    assert_all_gone([job_id])


@pytest.mark.slurm
def test_rejected_script_raises_with_the_batch_systems_message(tmp_path: Path) -> None:
    require_slurm(torque=True)
    with slurm(queue="no-such-partition", shared_temp_directory=tmp_path) as cluster:
        with pytest.raises(JobError, match=r"(?i)invalid partition"):
            cluster.scale(jobs=1)
        assert cluster.jobs == {}
    with PBSCluster(
        cores=1, memory="500MB", queue="no-such-queue", shared_temp_directory=tmp_path
    ) as cluster:
        # Torque's qsub prints sbatch's complaint on stdout and exits 1.
        with pytest.raises(JobError, match=r"(?is)qsub rejected.*invalid partition"):
            cluster.scale(jobs=1)


@pytest.mark.slurm
@pytest.mark.slow
def test_adapt_grows_from_zero_and_shrinks_back(tmp_path: Path) -> None:
    require_slurm()
    with slurm(shared_temp_directory=tmp_path) as cluster, Client(cluster) as client:
        adaptive = cluster.adapt(
            minimum_jobs=0, maximum_jobs=2, interval=0.2, wait_count=3
        )
        assert cluster.jobs == {}
        futures = client.map(slow_inc_name, range(12), delay=0.5)
        wait_for(lambda: len(cluster.jobs) == 2, 30, 0.1, "adapt to submit 2 jobs")
        seen = set(cluster.job_ids)
        results = client.gather(futures)
        assert [r for r, _ in results] == list(range(1, 13))
        assert max(t for _, t in adaptive.log) == 2
        del futures, results
        # Idle: after wait_count checks the jobs are cancelled.
        wait_for(lambda: cluster.jobs == {}, 30, 0.1, "adapt to shrink to 0")
        seen |= {j.id for j in cluster.job_history}
        assert {j.state for j in cluster.job_history} <= {
            JobState.cancelled,
            JobState.finished,
        }
        assert_all_gone(seen)
        assert adaptive.log[-1][1] == 0


@pytest.mark.slurm
@pytest.mark.slow
def test_scale_down_cancels_pending_jobs_before_running_ones(tmp_path: Path) -> None:
    require_slurm()
    # Every job is submitted held (PENDING, reason JobHeldUser); releasing only the
    # newer one makes the older one the pending job, so "pending first" and "newest
    # first" would cancel different jobs.
    with slurm(
        job_extra_directives=["--hold"], shared_temp_directory=tmp_path
    ) as cluster:
        cluster.scale(jobs=2)
        older, newer = cluster.job_ids
        subprocess.run(["scontrol", "release", newer], check=True, timeout=30)
        cluster.wait_for_workers(1, timeout=60)
        wait_for(
            lambda: cluster.jobs[newer].state is JobState.connected,
            30,
            0.1,
            "the released job to connect",
        )
        assert cluster.jobs[older].state is JobState.pending
        cluster.scale(jobs=1)
        assert cluster.job_ids == [newer]
        [cancelled] = cluster.job_history
        assert (cancelled.id, cancelled.state) == (older, JobState.cancelled)
        wait_for(lambda: older not in queue_ids(), 30, 0.2, "the pending job to go")
        assert newer in queue_ids()
        with Client(cluster) as client:
            assert client.submit(slow_inc_name, 1, 0.0).result(timeout=30) == (
                2,
                f"zworker-{newer}",
            )
    assert_all_gone([older, newer])


@pytest.mark.slurm
@pytest.mark.slow
def test_job_whose_worker_never_connects_is_reported(tmp_path: Path) -> None:
    require_slurm()
    log_dir = tmp_path / "logs"
    with slurm(
        python="/nonexistent/python",
        log_directory=str(log_dir),
        shared_temp_directory=tmp_path,
    ) as cluster:
        cluster.scale(jobs=1)
        with pytest.raises(JobError, match="before their workers connected") as info:
            cluster.wait_for_workers(1, timeout=90)
        assert "/nonexistent/python" in str(info.value)  # the job's own output
        failed = cluster.failed_jobs
        assert len(failed) == MAX_CONSECUTIVE_FAILURES
        assert all(j.state is JobState.failed for j in failed)
        assert all(j.queue_state == "FAILED" for j in failed)
        # It gave up: nothing more is submitted until the next scale().
        assert cluster.jobs == {}
        assert len(cluster.job_history) == MAX_CONSECUTIVE_FAILURES
        assert any(log_dir.iterdir())
    assert_all_gone(j.id for j in failed)


@pytest.mark.slurm
@pytest.mark.slow
def test_lifetime_hands_work_over_and_jobs_are_replaced(tmp_path: Path) -> None:
    require_slurm()
    with slurm(lifetime=4, shared_temp_directory=tmp_path) as cluster:
        cluster.scale(jobs=1)
        with Client(cluster) as client:
            futures = client.map(slow_inc_name, range(16), delay=0.6)
            results = client.gather(futures)
        # Every task ran exactly once to completion, none was lost or failed ...
        assert [r for r, _ in results] == list(range(1, 17))
        names = {n for _, n in results}
        # ... on more than one job: each retired at its lifetime and was replaced.
        assert len(names) >= 2, names
        finished = [j for j in cluster.job_history if j.state is JobState.finished]
        assert finished
        assert cluster.failed_jobs == []
        ids = {j.id for j in cluster.job_history} | set(cluster.job_ids)
    assert_all_gone(ids)


@pytest.mark.slurm
@pytest.mark.slow
def test_jobs_are_cancelled_when_the_python_process_exits(tmp_path: Path) -> None:
    require_slurm()
    program = textwrap.dedent(
        f"""
        from zdist import SLURMCluster
        cluster = SLURMCluster(cores=1, memory="500MB", processes=1,
                               walltime="00:05:00", poll_interval=0.5,
                               shared_temp_directory={str(tmp_path)!r})
        cluster.scale(jobs=1)
        cluster.wait_for_workers(1, timeout=60)
        print(cluster.job_ids[0], cluster._res.broker.pid, flush=True)
        # no close(): the interpreter's exit must cancel the job
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=90
    )
    assert out.returncode == 0, out.stderr
    job_id, broker_pid = out.stdout.split()
    assert_all_gone([job_id])
    assert not pid_alive(int(broker_pid))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slurm
@pytest.mark.slow
def test_cluster_joins_a_running_broker_through_its_scheduler_file(
    tmp_path: Path,
) -> None:
    require_slurm()
    sched = tmp_path / "scheduler.json"
    broker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "zdist.broker",
            "--port",
            "0",
            "--host",
            "0.0.0.0",
            "--scheduler-file",
            str(sched),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert broker.stdout is not None
        assert "listening at" in broker.stdout.readline().decode()
        with slurm(
            cores=2,
            processes=2,
            scheduler_file=str(sched),
            shared_temp_directory=tmp_path,
        ) as cluster:
            assert f"--scheduler-file {sched} " in cluster.job_script()
            cluster.scale(jobs=1)
            [job_id] = cluster.job_ids
            cluster.wait_for_workers(2, timeout=60)
            # Two worker processes in one job: zworker's -0, -1 suffixes.
            names = {f"zworker-{job_id}-0", f"zworker-{job_id}-1"}
            assert cluster.jobs[job_id].workers == names
            assert cluster.jobs[job_id].state is JobState.connected
            with Client(scheduler_file=str(sched)) as client:
                value, name = client.submit(slow_inc_name, 1, 0.0).result(timeout=60)
                assert value == 2 and name in names
        assert_all_gone([job_id])
        assert broker.poll() is None  # not ours to stop
    finally:
        broker.terminate()
        broker.wait(10)
        assert broker.stdout is not None
        broker.stdout.close()


# ---- PBS Pro's output, from a stand-in qsub/qstat/qdel ------------------------------

FAKE_PBS = {
    "qsub": r"""
n=$(( $(cat "$PBS_STATE/counter" 2>/dev/null || echo 1000) + 1 ))
echo "$n" > "$PBS_STATE/counter"
echo Q > "$PBS_STATE/job.$n"
echo "qsub $* cwd=$PWD" >> "$PBS_STATE/calls"
echo "$n.gadi-pbs"
""",
    "qstat": r"""
echo "qstat $*" >> "$PBS_STATE/calls"
echo "Job id            Name             User              Time Use S Queue"
echo "----------------  ---------------- ----------------  -------- - -----"
rc=0
for id in "$@"; do
    n=${id%%.*}
    if [ -f "$PBS_STATE/finished.$n" ]; then  # PBS Pro with job history (Gadi)
        echo "qstat: $id Job has finished, use -x or -H to obtain historical job" \
            "information" >&2
        rc=35
    elif [ -f "$PBS_STATE/job.$n" ]; then
        printf '%-17s %-16s %-17s %-8s %s %s\n' "$id" zworker jdoe 0 \
            "$(cat "$PBS_STATE/job.$n")" normal
    else
        echo "qstat: Unknown Job Id $id" >&2
        rc=153
    fi
done
exit $rc
""",
    "qdel": r"""
echo "qdel $*" >> "$PBS_STATE/calls"
for id in "$@"; do rm -f "$PBS_STATE/job.${id%%.*}"; done
""",
}


def test_pbs_pro_job_ids_states_and_failures_with_a_stand_in_pbs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Torque-on-Slurm prints bare numbers; PBS Pro (Gadi) prints "1001.gadi-pbs",
    # lists ended jobs as unknown (exit 153) and names output files job_name.oNNN.
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    for name, body in FAKE_PBS.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o700)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("PBS_STATE", str(state))
    calls = state / "calls"
    with PBSCluster(
        cores=2,
        memory="1GB",
        shared_temp_directory=tmp_path / "shared",
        poll_interval=0.1,
    ) as cluster:
        keys = secrets_of(cluster.scheduler_file)
        assert cluster.worker_processes == 2  # cores=2: dask's split, 2 x 1 thread
        cluster.scale(3)  # workers: two jobs of two
        assert cluster.job_ids == ["1001.gadi-pbs", "1002.gadi-pbs"]
        wait_for(
            lambda: "qstat 1001.gadi-pbs 1002.gadi-pbs" in calls.read_text(),
            10,
            0.05,
            "a queue poll",
        )
        assert {j.state for j in cluster.jobs.values()} == {JobState.pending}
        # Job 1001 runs, writes its output and ends without a worker connecting.
        submit_dir = Path(cluster.scheduler_file).parent  # the private directory
        (submit_dir / "zworker.o1001").write_text("zworker: cannot import zdist\n")
        (state / "job.1001").write_text("R\n")
        wait_for(
            lambda: cluster.jobs["1001.gadi-pbs"].state is JobState.running,
            10,
            0.05,
            "job 1001 running",
        )
        (state / "job.1001").unlink()
        wait_for(lambda: cluster.failed_jobs, 10, 0.05, "job 1001 reported")
        [failed] = cluster.failed_jobs
        assert failed.id == "1001.gadi-pbs" and failed.queue_state == "R"
        assert "before any worker registered as zworker-1001.gadi-pbs" in failed.reason
        assert "cannot import zdist" in failed.reason
        # scale(jobs=2) still stands: a replacement is submitted.
        wait_for(lambda: "1003.gadi-pbs" in cluster.jobs, 10, 0.05, "a replacement")
        (state / "job.1002").write_text("R\n")
        wait_for(
            lambda: cluster.jobs["1002.gadi-pbs"].state is JobState.running,
            10,
            0.05,
            "job 1002 running",
        )
        cluster.scale(jobs=1)  # the queued 1003 goes, not the running 1002
        assert cluster.job_ids == ["1002.gadi-pbs"]
        assert "qdel 1003.gadi-pbs\n" in calls.read_text()
        # Every listed job ended: qstat answers only "Job has finished" (exit 35).
        (state / "job.1002").rename(state / "finished.1002")
        wait_for(lambda: len(cluster.failed_jobs) == 2, 10, 0.05, "job 1002 ended")
        assert cluster.failed_jobs[1].id == "1002.gadi-pbs"
        wait_for(lambda: "1004.gadi-pbs" in cluster.jobs, 10, 0.05, "a replacement")
    assert "qdel 1004.gadi-pbs\n" in calls.read_text()
    text = calls.read_text()
    assert text.count("qsub ") == 4
    for key in keys:
        assert key not in text
