"""SLURMCluster: JobQueueCluster on Slurm (sbatch, squeue, scancel)."""

from __future__ import annotations

import getpass
from typing import Any

from zdist.client.jobqueue import JobQueueCluster
from zdist.client.jobs import Job, JobError, _output, _run
from zdist.client.jobscript import JobSpec, render_slurm


class SLURMCluster(JobQueueCluster):
    """Workers in Slurm jobs: sbatch, squeue, scancel."""

    submit_command = "sbatch"
    cancel_command = "scancel"
    PENDING = frozenset(
        {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}
    )
    RUNNING = frozenset(
        {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "RESIZING"}
    )

    def _spec(self, **kwargs: Any) -> JobSpec:
        if kwargs.get("resource_spec") is not None:
            raise ValueError(
                "resource_spec is PBS syntax; give Slurm options with "
                "job_extra_directives (e.g. ['--gres=gpu:1'])"
            )
        return JobSpec(**kwargs)

    def job_script(self) -> str:
        return render_slurm(self.spec)

    def _queue_states(self, jobs: list[Job]) -> dict[str, str]:
        # All of the user's jobs, finished ones included (-t all keeps them for
        # MinJobAge): one call, and no error for ids that have already gone.
        user = getpass.getuser()
        result = _run(["squeue", "-h", "-t", "all", "-o", "%i %T", "-u", user])
        if result.returncode != 0:
            text = _output(result)
            raise JobError(f"squeue failed (exit {result.returncode}): {text}")
        states: dict[str, str] = {}
        for line in result.stdout.splitlines():
            words = line.split()
            if len(words) == 2 and words[0].isdigit():
                states[words[0]] = words[1]
        return states
