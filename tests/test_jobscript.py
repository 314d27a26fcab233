"""Job-script rendering for PBS and Slurm: pure tests, exact text."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
from pathlib import Path

import pytest

from zdist.client.jobscript import (
    JobSpec,
    default_lifetime,
    format_pbs_memory,
    format_slurm_memory,
    format_walltime,
    nprocesses_nthreads,
    parse_memory,
    parse_walltime,
    render_pbs,
    render_slurm,
    worker_command,
)

pytestmark = pytest.mark.timeout(10)

SCHEDULER_FILE = "/home/jdoe/.zdist/cluster-1/scheduler.json"
PY = "/opt/py/bin/python"

# The seed tutorial's PBSCluster call, argument for argument (Gadi, NCI).
SEED_KWARGS: dict[str, object] = dict(
    walltime="00:20:00",
    cores=48,
    memory="192GB",
    shebang="#!/usr/bin/env bash",
    job_extra_directives=["-q normal", "-P vp91", "-l ncpus=48", "-l mem=192GB"],
    local_directory="$TMPDIR",
    job_directives_skip=["select"],
    interface="ib0",
    job_script_prologue=[
        "module load python3/3.11.0",
        "module load cmake/3.16.2",
        "source /scratch/abc/Training-Venv/parallel_python/bin/activate",
    ],
    python="/scratch/vp91/Training-Venv/parallel_python/bin/python3",
)

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
--scheduler-file /home/jdoe/.zdist/cluster-1/scheduler.json \
--nthreads 6 --nworkers 8 --memory-limit 24000000000 \
--name zworker-${PBS_JOBID:-$SLURM_JOB_ID} --death-timeout 60 --lifetime 960s \
--local-directory $TMPDIR --interface ib0
"""


def spec(**kwargs: object) -> JobSpec:
    kwargs.setdefault("scheduler_file", SCHEDULER_FILE)
    kwargs.setdefault("python", PY)
    return JobSpec(**kwargs)  # type: ignore[arg-type]


def test_seed_gadi_script_verbatim() -> None:
    script = render_pbs(JobSpec(**SEED_KWARGS, scheduler_file=SCHEDULER_FILE))  # type: ignore[arg-type]
    assert script == SEED_SCRIPT
    # Gadi's qsub refuses select; the skip must not leave one behind.
    assert "select" not in script


def test_pbs_pro_defaults_select_line() -> None:
    script = render_pbs(
        spec(
            cores=24,
            memory="100GB",
            processes=6,
            queue="regular",
            account="P48500028",
            walltime="02:00:00",
        )
    )
    assert script == (
        "#!/usr/bin/env bash\n"
        "\n"
        "#PBS -N zworker\n"
        "#PBS -q regular\n"
        "#PBS -A P48500028\n"
        "#PBS -l select=1:ncpus=24:mem=94GB\n"  # 100e9 bytes = 93.1 GiB, rounded up
        "#PBS -l walltime=02:00:00\n"
        "\n"
        f"{PY} -m zdist.worker --scheduler-file {SCHEDULER_FILE} --nthreads 4 "
        "--nworkers 6 --memory-limit 16666666666 "
        "--name zworker-${PBS_JOBID:-$SLURM_JOB_ID} --death-timeout 60 "
        "--lifetime 6900s\n"
    )


def test_pbs_without_memory_selects_cores_only() -> None:
    script = render_pbs(spec(cores=2, walltime=None))
    assert "#PBS -l select=1:ncpus=2\n" in script
    assert "--memory-limit" not in script
    assert "walltime" not in script
    assert "--lifetime" not in script


def test_torque_resource_spec_replaces_select() -> None:
    script = render_pbs(
        spec(cores=1, memory="1GB", resource_spec="nodes=1:ppn=1", walltime="00:05:00")
    )
    assert script == (
        "#!/usr/bin/env bash\n"
        "\n"
        "#PBS -N zworker\n"
        "#PBS -l nodes=1:ppn=1\n"
        "#PBS -l walltime=00:05:00\n"
        "\n"
        f"{PY} -m zdist.worker --scheduler-file {SCHEDULER_FILE} --nthreads 1 "
        "--nworkers 1 --memory-limit 1000000000 "
        "--name zworker-${PBS_JOBID:-$SLURM_JOB_ID} --death-timeout 60 "
        "--lifetime 240s\n"
    )


def test_slurm_header_and_command() -> None:
    script = render_slurm(
        spec(
            cores=4,
            processes=2,
            memory="4GiB",
            queue="debug",
            account="proj1",
            walltime="00:10:00",
            log_directory="/shared/logs",
            job_extra_directives=["--exclusive"],
            job_script_epilogue=["echo done"],
        )
    )
    assert script == (
        "#!/usr/bin/env bash\n"
        "\n"
        "#SBATCH -J zworker\n"
        "#SBATCH -e /shared/logs/zworker-%J.err\n"
        "#SBATCH -o /shared/logs/zworker-%J.out\n"
        "#SBATCH -p debug\n"
        "#SBATCH -A proj1\n"
        "#SBATCH -n 1\n"
        "#SBATCH --cpus-per-task=4\n"
        "#SBATCH --mem=4G\n"
        "#SBATCH -t 00:10:00\n"
        "#SBATCH --exclusive\n"
        "\n"
        f"{PY} -m zdist.worker --scheduler-file {SCHEDULER_FILE} --nthreads 2 "
        "--nworkers 2 --memory-limit 2147483648 --name zworker-$SLURM_JOB_ID "
        "--death-timeout 60 --lifetime 480s\n"
        "\n"
        "echo done\n"
    )


def test_pbs_log_directory() -> None:
    script = render_pbs(spec(cores=1, log_directory="/shared/logs"))
    assert "#PBS -e /shared/logs/\n#PBS -o /shared/logs/\n" in script


@pytest.mark.parametrize(
    ("text", "nbytes", "pbs", "slurm"),
    [
        # PBS and Slurm read GB/G as GiB; rounded up, the job never asks for less
        # than its workers may use (192e9 bytes = 178.8 GiB).
        ("192GB", 192 * 10**9, "179GB", "179G"),
        ("4GiB", 4 * 2**30, "4096MB", "4G"),
        ("500MB", 500 * 10**6, "477MB", "477M"),
        ("1.5TB", 15 * 10**11, "1397GB", "1397G"),
        ("5 gb", 5 * 10**9, "4769MB", "5G"),
        ("4G", 4 * 10**9, "3815MB", "4G"),
        ("10kB", 10**4, "10000B", "10K"),
        ("1024", 1024, "1024B", "1K"),
    ],
)
def test_memory_units(text: str, nbytes: int, pbs: str, slurm: str) -> None:
    assert parse_memory(text) == nbytes
    assert format_pbs_memory(nbytes) == pbs
    assert format_slurm_memory(nbytes) == slurm


def test_memory_split_per_worker() -> None:
    job = spec(cores=48, memory="192GB")
    assert (job.worker_processes, job.threads_per_worker) == (8, 6)
    assert job.total_memory == 192 * 10**9
    assert job.memory_per_worker == 24 * 10**9


@pytest.mark.parametrize(
    ("cores", "processes", "nthreads"),
    [(1, 1, 1), (4, 4, 1), (7, 7, 1), (12, 4, 3), (32, 8, 4), (48, 8, 6)],
)
def test_default_processes_threads(cores: int, processes: int, nthreads: int) -> None:
    assert nprocesses_nthreads(cores) == (processes, nthreads)
    command = worker_command(spec(cores=cores), "$JOB")
    assert f"--nthreads {nthreads} --nworkers {processes} " in command


def test_explicit_processes() -> None:
    command = worker_command(spec(cores=4, processes=2), "$JOB")
    assert " --nthreads 2 --nworkers 2 " in command


def test_death_timeout_written_as_seconds() -> None:
    assert " --death-timeout 1.5 " in worker_command(
        spec(cores=1, death_timeout=1.5), "$JOB"
    )
    assert "--death-timeout" not in worker_command(
        spec(cores=1, death_timeout=None), "$JOB"
    )


def test_long_job_name_truncated_for_pbs_only() -> None:
    job = spec(cores=1, job_name="averyveryverylongjobname")
    pbs = render_pbs(job)
    assert "#PBS -N averyveryverylo\n" in pbs
    assert "--name averyveryverylongjobname-${PBS_JOBID:-$SLURM_JOB_ID} " in pbs
    assert "#SBATCH -J averyveryverylongjobname\n" in render_slurm(job)


def test_skip_removes_generated_lines_but_keeps_extras() -> None:
    job = spec(
        cores=2,
        memory="4GB",
        account="abc",
        job_directives_skip=["mem", "-A"],
        job_extra_directives=["-l mem=4GB"],
    )
    assert render_pbs(job).splitlines()[2:6] == [
        "#PBS -N zworker",
        "#PBS -l walltime=00:30:00",
        "#PBS -l mem=4GB",
        "",
    ]
    slurm = render_slurm(job)
    assert "--mem=" not in slurm
    assert "-A abc" not in slurm
    assert "#SBATCH -l mem=4GB\n" in slurm


def test_values_starting_with_dollar_stay_unquoted() -> None:
    command = worker_command(
        spec(
            cores=1,
            local_directory="$TMPDIR",
            scheduler_file="$HOME/.zdist/scheduler.json",
            worker_extra_args=["--resources", "GPU=auto", "--tag", "a b"],
        ),
        "$JOB",
    )
    assert "--local-directory $TMPDIR" in command
    assert "--scheduler-file $HOME/.zdist/scheduler.json " in command
    assert command.endswith(" --resources GPU=auto --tag 'a b'")
    assert "'$" not in command


def test_tmpdir_expands_on_the_compute_node(tmp_path: Path) -> None:
    # Run the rendered command under bash with a stand-in python that prints its
    # argv: $TMPDIR and the job id must arrive expanded, quoted values intact.
    printer = tmp_path / "printargs"
    printer.write_text("#!/bin/sh\nfor a; do printf '<%s>\\n' \"$a\"; done\n")
    printer.chmod(printer.stat().st_mode | stat.S_IXUSR)
    job = spec(cores=1, python=str(printer), local_directory="$TMPDIR")
    command = worker_command(job, "${PBS_JOBID:-$SLURM_JOB_ID}")
    env = {"PATH": os.environ["PATH"], "TMPDIR": "/jobfs/42", "SLURM_JOB_ID": "77"}
    out = subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[out.index("<--local-directory>") + 1] == "</jobfs/42>"
    assert out[out.index("<--name>") + 1] == "<zworker-77>"
    env["PBS_JOBID"] = "1234.gadi-pbs"
    out = subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[out.index("<--name>") + 1] == "<zworker-1234.gadi-pbs>"

    spaced = spec(cores=1, python=str(printer), local_directory="/scratch/my dir")
    out = subprocess.run(
        ["bash", "-c", worker_command(spaced, "1")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[out.index("<--local-directory>") + 1] == "</scratch/my dir>"


def test_lifetime_default_and_explicit() -> None:
    assert default_lifetime(1200) == 960  # 20 min job: 80% floor wins
    assert default_lifetime(3600) == 3300  # 1 h job: 5 min margin
    assert default_lifetime(7200) == 6900
    assert default_lifetime(60) == 48
    assert spec(cores=1, walltime="01:00:00").lifetime_seconds == 3300
    assert (
        spec(cores=1, walltime="01:00:00", lifetime="00:50:00").lifetime_seconds == 3000
    )
    assert spec(cores=1, lifetime=100.5).lifetime_seconds == 101
    assert spec(cores=1, walltime=None).lifetime_seconds is None


def test_walltime_parse_and_format() -> None:
    assert parse_walltime("00:20:00") == 1200
    assert parse_walltime("48:00:00") == 172800
    assert parse_walltime("90:00") == 5400
    assert format_walltime(3661) == "01:01:01"
    assert "#PBS -l walltime=01:00:00\n" in render_pbs(
        spec(cores=1, walltime="1:00:00")
    )


def test_no_field_can_carry_a_secret() -> None:
    # Everything in a JobSpec is written into a script that `qstat -f` shows to all
    # users. Adding a field? Make sure it cannot hold a key, then list it here.
    assert {f.name for f in dataclasses.fields(JobSpec)} == {
        "cores", "memory", "processes", "queue", "account", "walltime", "job_name",
        "resource_spec", "job_extra_directives", "job_directives_skip",
        "job_script_prologue", "job_script_epilogue", "shebang", "python",
        "local_directory", "interface", "log_directory", "death_timeout",
        "worker_extra_args", "lifetime", "scheduler_file",
    }  # fmt: skip
    # Rendering never opens the scheduler file (it need not exist here).
    assert not Path(SCHEDULER_FILE).exists()
    assert f"--scheduler-file {SCHEDULER_FILE} " in render_slurm(spec(cores=1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cores": 0}, "cores must be"),
        ({"cores": True}, "cores must be"),
        ({"cores": 4, "processes": 5}, "processes must be"),
        ({"cores": 1, "memory": "lots"}, "memory must be a size"),
        ({"cores": 1, "memory": "4XB"}, "unknown memory unit"),
        ({"cores": 1, "memory": "0GB"}, "memory must be positive"),
        ({"cores": 1, "walltime": "abc"}, "walltime must look like"),
        ({"cores": 1, "walltime": "20"}, "walltime must look like"),
        ({"cores": 1, "walltime": "00:61:00"}, "past 59"),
        ({"cores": 1, "walltime": "00:00:00"}, "longer than zero"),
        ({"cores": 1, "job_name": "my job"}, "job_name may hold"),
        ({"cores": 1, "shebang": "/bin/bash"}, "shebang must start"),
        ({"cores": 1, "job_extra_directives": "-q normal"}, "list of strings"),
        ({"cores": 1, "queue": "normal\nrm -rf ~"}, "queue must be one line"),
        ({"cores": 1, "death_timeout": 0}, "death_timeout must be"),
        ({"cores": 1, "lifetime": "soon"}, "lifetime must be"),
        ({"cores": 1, "walltime": "00:10:00", "lifetime": 3600}, "longer than"),
    ],
)
def test_invalid_input_raises_clear_errors(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        spec(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheduler_file": None}, "scheduler_file is required"),
        ({"scheduler_file": "scheduler.json"}, "absolute path"),
        ({"local_directory": "$TMPDIR; rm -rf ~"}, "left unquoted"),
    ],
)
def test_invalid_command_values(kwargs: dict[str, object], message: str) -> None:
    job = spec(cores=1, **kwargs)
    with pytest.raises(ValueError, match=message):
        render_pbs(job)
