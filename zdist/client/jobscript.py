"""Batch job scripts for PBS and Slurm, rendered as a pure function of a JobSpec.

No sockets, no subprocess, no file access: PBSCluster/SLURMCluster build a JobSpec
from their keyword arguments (dask-jobqueue's names and meanings) and call
`render_pbs` / `render_slurm`; submitting the text is their business.

Rules (the module's contract):

- Memory. `memory` is the job's total and is parsed the way dask parses it:
  "GB" = 10**9 bytes, "GiB" = 2**30. Each worker gets `--memory-limit total //
  processes` in plain bytes. The batch header states the job total the way the
  batch system reads it: PBS and Slurm both mean 2**30 by "GB"/"G", so 192 GB
  becomes `mem=179GB` (PBS) / `--mem=179G` (Slurm), rounded up so the job never
  asks for less than the workers may use.
- Lifetime. Workers get `--lifetime` so they hand work back before the batch system
  kills them: by default walltime minus 5 minutes, but never less than 80% of the
  walltime (a 20-minute job keeps 16 minutes, a 2-hour job 1h55m).
- Quoting. Values that start with `$` or `~` are meant for the compute node's shell
  to expand (`local_directory="$TMPDIR"`), so they go in unquoted and may hold only
  path and parameter-expansion characters; every other value is shlex-quoted.
  Prologue and epilogue lines are shell code and go in as given.
- Secrets. No field of JobSpec carries a credential. Workers find the broker's
  address and keys in the scheduler file (mode 0600 on the shared filesystem); the
  script holds only its path, because `qstat -f` and `ps` show scripts and argv to
  every user.
"""

from __future__ import annotations

import math
import re
import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from zdist.units import parse_memory

# Torque and old PBS Pro cut job names at 15 characters; truncating here keeps the
# name visible in qstat the same as the one written in the script.
PBS_MAX_JOB_NAME = 15

# Margin for the default --lifetime: time for a worker to finish its running task and
# hand back its queue. When single tasks run longer than this, set `lifetime` by hand.
LIFETIME_MARGIN_S = 300
LIFETIME_MIN_FRACTION = 0.8

# Torque-on-Slurm (slurm-wlm-torque) reads #PBS lines but sets no PBS_JOBID.
PBS_JOB_ID = "${PBS_JOBID:-$SLURM_JOB_ID}"
SLURM_JOB_ID = "$SLURM_JOB_ID"

_WALLTIME_RE = re.compile(r"^(?:(\d+):)?(\d+):(\d+)$")
_JOB_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
# What an unquoted `$VAR/sub`, `${A:-$B}` or `~/dir` may contain: nothing that the
# shell would split on or treat as a command separator.
_SHELL_REF_RE = re.compile(r"^[$~][A-Za-z0-9_${}:/.@%+=,~-]*$")


def format_pbs_memory(n: int) -> str:
    """`n` bytes as PBS reads it ("GB" = 2**30), rounded up.

    The largest unit that still holds 10 of them keeps the rounding under 10%:
    1.5 GiB is written 1536MB, not 2GB.
    """
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= 10 * size:
            return f"{math.ceil(n / size)}{unit}"
    return f"{n}B"


def format_slurm_memory(n: int) -> str:
    """`n` bytes for `#SBATCH --mem` ("G" = 2**30), rounded up; no bytes unit."""
    for unit, size in (("G", 2**30), ("M", 2**20)):
        if n >= size:
            return f"{math.ceil(n / size)}{unit}"
    return f"{max(1, math.ceil(n / 2**10))}K"


def parse_walltime(value: str) -> int:
    """Seconds in "HH:MM:SS" or "MM:SS" (hours may pass 24: "48:00:00")."""
    # A bare number is refused: PBS reads "20" as seconds, Slurm as minutes.
    match = _WALLTIME_RE.match(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"walltime must look like 'HH:MM:SS', not {value!r}")
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    if seconds >= 60 or (match.group(1) is not None and minutes >= 60):
        raise ValueError(f"walltime {value!r} has minutes or seconds past 59")
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ValueError(f"walltime must be longer than zero, not {value!r}")
    return total


def format_walltime(seconds: int) -> str:
    """`seconds` as "HH:MM:SS", which PBS and Slurm both read the same way."""
    if seconds <= 0:
        raise ValueError(f"walltime must be longer than zero, not {seconds!r} s")
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}"


def default_lifetime(walltime_s: int) -> int:
    """Seconds a worker runs in a job of `walltime_s` before it retires."""
    return max(walltime_s - LIFETIME_MARGIN_S, int(walltime_s * LIFETIME_MIN_FRACTION))


def nprocesses_nthreads(cores: int) -> tuple[int, int]:
    """dask's default split of `cores`: one thread per process up to 4 cores, then
    the smallest divisor of `cores` not below its square root, so processes and
    threads per process come out about equal (48 -> 8 x 6, 32 -> 8 x 4)."""
    if cores <= 4:
        return cores, 1
    processes = min(d for d in range(1, cores + 1) if cores % d == 0 and d * d >= cores)
    return processes, cores // processes


def shell_word(value: str) -> str:
    """`value` as one shell word; `$...` and `~...` stay unquoted so they expand."""
    if value[:1] in ("$", "~"):
        if not _SHELL_REF_RE.match(value):
            raise ValueError(
                f"{value!r} starts with '$' or '~', so it is left unquoted for the "
                "compute node's shell to expand; it may then hold only letters, "
                "digits and _${}:/.@%+=,~- (no spaces or shell operators)"
            )
        return value
    return shlex.quote(value)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive(value: object) -> bool:
    positive = isinstance(value, (int, float)) and value > 0
    return positive and not isinstance(value, bool)


def _one_line(field: str, value: str | None) -> None:
    # A newline would end the directive and start a shell command in the script.
    _require(
        value is None or not ("\n" in value or "\r" in value),
        f"{field} must be one line, not {value!r}",
    )


def _strings(field: str, value: Iterable[str]) -> tuple[str, ...]:
    # dask-jobqueue users pass lists; a bare string would be read letter by letter.
    items = () if isinstance(value, str) else tuple(value)
    if isinstance(value, str) or not all(isinstance(v, str) for v in items):
        raise ValueError(f"{field} must be a list of strings, not {value!r}")
    return items


_LIST_FIELDS = (
    "job_extra_directives",
    "job_directives_skip",
    "job_script_prologue",
    "job_script_epilogue",
    "worker_extra_args",
)


@dataclass(frozen=True)
class JobSpec:
    """One batch job's worth of workers, with dask-jobqueue's parameter names.

    Every field is public data: it ends up in a script that other users can read.
    """

    cores: int
    memory: str | None = None
    processes: int | None = None
    queue: str | None = None
    account: str | None = None
    walltime: str | None = "00:30:00"
    job_name: str = "zworker"
    resource_spec: str | None = None
    job_extra_directives: tuple[str, ...] = ()
    job_directives_skip: tuple[str, ...] = ()
    job_script_prologue: tuple[str, ...] = ()
    job_script_epilogue: tuple[str, ...] = ()
    shebang: str = "#!/usr/bin/env bash"
    python: str = sys.executable
    local_directory: str | None = None
    interface: str | None = None
    log_directory: str | None = None
    death_timeout: float | None = 60
    worker_extra_args: tuple[str, ...] = ()
    lifetime: float | str | None = None
    scheduler_file: str | None = None

    def __post_init__(self) -> None:
        for name in _LIST_FIELDS:
            object.__setattr__(self, name, _strings(name, getattr(self, name)))
        _require(
            _is_int(self.cores) and self.cores >= 1,
            f"cores must be a whole number of at least 1, not {self.cores!r}",
        )
        _require(
            self.processes is None
            or (_is_int(self.processes) and 1 <= self.processes <= self.cores),
            f"processes must be from 1 to cores={self.cores}, not {self.processes!r}",
        )
        if self.memory is not None:
            parse_memory(self.memory)
        walltime_s = None if self.walltime is None else parse_walltime(self.walltime)
        _require(
            bool(_JOB_NAME_RE.match(self.job_name or "")),
            f"job_name may hold only letters, digits and _.+-, not {self.job_name!r}",
        )
        _require(
            self.shebang.startswith("#!"),
            f"shebang must start with '#!', not {self.shebang!r}",
        )
        for name in ("queue", "account", "resource_spec", "log_directory"):
            _one_line(name, getattr(self, name))
        for line in self.job_extra_directives:
            _one_line("job_extra_directives", line)
        _require(
            self.death_timeout is None or _is_positive(self.death_timeout),
            f"death_timeout must be positive seconds, not {self.death_timeout!r}",
        )
        lifetime = self.lifetime_seconds
        _require(
            lifetime is None or walltime_s is None or lifetime <= walltime_s,
            f"lifetime {self.lifetime!r} is longer than walltime {self.walltime!r}",
        )

    @property
    def worker_processes(self) -> int:
        """Worker processes per job (what scale(n) divides by)."""
        return (
            self.processes
            if self.processes is not None
            else nprocesses_nthreads(self.cores)[0]
        )

    @property
    def threads_per_worker(self) -> int:
        return self.cores // self.worker_processes

    @property
    def total_memory(self) -> int | None:
        """The job's memory in bytes, or None when the job states none."""
        return None if self.memory is None else parse_memory(self.memory)

    @property
    def memory_per_worker(self) -> int | None:
        total = self.total_memory
        return None if total is None else total // self.worker_processes

    @property
    def lifetime_seconds(self) -> int | None:
        """--lifetime in seconds: the explicit one, else derived from the walltime."""
        if self.lifetime is None:
            if self.walltime is None:
                return None
            return default_lifetime(parse_walltime(self.walltime))
        if isinstance(self.lifetime, str):
            try:
                return parse_walltime(self.lifetime)
            except ValueError:
                pass
        _require(
            _is_positive(self.lifetime),
            f"lifetime must be positive seconds or 'HH:MM:SS', not {self.lifetime!r}",
        )
        return math.ceil(self.lifetime)  # type: ignore[arg-type]


def worker_command(spec: JobSpec, job_id_ref: str) -> str:
    """The zworker command line; `job_id_ref` is the shell reference to the job id."""
    if not spec.scheduler_file:
        raise ValueError(
            "scheduler_file is required: workers find the broker's address and keys "
            "in it, on a filesystem shared with the compute nodes"
        )
    if spec.scheduler_file[:1] not in ("/", "$", "~"):
        # Jobs start in $HOME (PBS) or the submit directory (Slurm), not here.
        raise ValueError(
            f"scheduler_file must be an absolute path, not {spec.scheduler_file!r}"
        )
    args = [shell_word(spec.python), "-m", "zdist.worker"]
    args += ["--scheduler-file", shell_word(spec.scheduler_file)]
    args += ["--nthreads", str(spec.threads_per_worker)]
    args += ["--nworkers", str(spec.worker_processes)]
    if spec.memory_per_worker is not None:
        args += ["--memory-limit", str(spec.memory_per_worker)]
    args += ["--name", f"{spec.job_name}-{job_id_ref}"]
    if spec.death_timeout is not None:
        args += ["--death-timeout", f"{spec.death_timeout:.15g}"]
    if spec.lifetime_seconds is not None:
        args += ["--lifetime", f"{spec.lifetime_seconds}s"]
    if spec.local_directory is not None:
        args += ["--local-directory", shell_word(spec.local_directory)]
    if spec.interface is not None:
        args += ["--interface", shell_word(spec.interface)]
    args += [shell_word(a) for a in spec.worker_extra_args]
    return " ".join(args)


def pbs_header(spec: JobSpec) -> list[str]:
    """The #PBS lines: generated ones minus job_directives_skip, then the extras."""
    lines = [f"#PBS -N {spec.job_name[:PBS_MAX_JOB_NAME]}"]
    if spec.queue is not None:
        lines.append(f"#PBS -q {spec.queue}")
    if spec.account is not None:
        lines.append(f"#PBS -A {spec.account}")
    resources = spec.resource_spec
    if resources is None:
        # PBS Pro's chunk syntax; Gadi rejects it (skip "select"), Torque wants
        # resource_spec="nodes=1:ppn=N".
        resources = f"select=1:ncpus={spec.cores}"
        if spec.total_memory is not None:
            resources += f":mem={format_pbs_memory(spec.total_memory)}"
    lines.append(f"#PBS -l {resources}")
    if spec.walltime is not None:
        lines.append(
            f"#PBS -l walltime={format_walltime(parse_walltime(spec.walltime))}"
        )
    if spec.log_directory is not None:
        lines += [f"#PBS -e {spec.log_directory}/", f"#PBS -o {spec.log_directory}/"]
    return _skip(lines, spec) + [f"#PBS {d}" for d in spec.job_extra_directives]


def slurm_header(spec: JobSpec) -> list[str]:
    """The #SBATCH lines: generated ones minus job_directives_skip, then the extras."""
    lines = [f"#SBATCH -J {spec.job_name}"]
    if spec.log_directory is not None:
        lines += [
            f"#SBATCH -e {spec.log_directory}/{spec.job_name}-%J.err",
            f"#SBATCH -o {spec.log_directory}/{spec.job_name}-%J.out",
        ]
    if spec.queue is not None:
        lines.append(f"#SBATCH -p {spec.queue}")
    if spec.account is not None:
        lines.append(f"#SBATCH -A {spec.account}")
    # One task holding every core: the workers are started by zworker, not srun.
    lines += ["#SBATCH -n 1", f"#SBATCH --cpus-per-task={spec.cores}"]
    if spec.total_memory is not None:
        lines.append(f"#SBATCH --mem={format_slurm_memory(spec.total_memory)}")
    if spec.walltime is not None:
        lines.append(f"#SBATCH -t {format_walltime(parse_walltime(spec.walltime))}")
    return _skip(lines, spec) + [f"#SBATCH {d}" for d in spec.job_extra_directives]


def _skip(lines: list[str], spec: JobSpec) -> list[str]:
    # As in dask-jobqueue, skipping applies to generated lines only: the user's own
    # job_extra_directives are kept even when they contain a skipped string.
    return [ln for ln in lines if not any(s in ln for s in spec.job_directives_skip)]


def _script(spec: JobSpec, header: list[str], job_id_ref: str) -> str:
    # Blank lines between sections: PBS and Slurm keep reading directives across
    # them and stop only at the first command.
    sections = [
        [spec.shebang],
        header,
        [ln for ln in spec.job_script_prologue if ln],
        [worker_command(spec, job_id_ref)],
        [ln for ln in spec.job_script_epilogue if ln],
    ]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"


def render_pbs(spec: JobSpec) -> str:
    """The PBS (PBS Pro, OpenPBS, Torque) job script for `spec`."""
    return _script(spec, pbs_header(spec), PBS_JOB_ID)


def render_slurm(spec: JobSpec) -> str:
    """The Slurm job script for `spec`."""
    return _script(spec, slurm_header(spec), SLURM_JOB_ID)
