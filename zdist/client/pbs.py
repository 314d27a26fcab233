"""PBSCluster: JobQueueCluster on PBS Pro, OpenPBS or Torque (qsub, qstat, qdel)."""

from __future__ import annotations

import re

from zdist.client.jobqueue import JobQueueCluster
from zdist.client.jobs import Job, JobError, _output, _run
from zdist.client.jobscript import render_pbs


class PBSCluster(JobQueueCluster):
    """Workers in PBS jobs (PBS Pro, OpenPBS, Torque): qsub, qstat, qdel.

    On NCI's Gadi, skip the ``select`` line and state resources the Gadi way::

        PBSCluster(cores=48, memory="192GB", walltime="00:20:00",
                   job_directives_skip=["select"],
                   job_extra_directives=["-q normal", "-P vp91",
                                         "-l ncpus=48", "-l mem=192GB"],
                   local_directory="$TMPDIR", interface="ib0")

    On Torque use ``resource_spec="nodes=1:ppn=N"``.
    """

    submit_command = "qsub"
    cancel_command = "qdel"
    #: qstat's one-letter states (PBS Pro and Torque); C, F, X and absent mean ended.
    PENDING = frozenset("QHWTM")
    RUNNING = frozenset("REBSU")

    def job_script(self) -> str:
        return render_pbs(self.spec)

    def _queue_states(self, jobs: list[Job]) -> dict[str, str]:
        result = _run(["qstat", *(j.id for j in jobs)])
        states: dict[str, str] = {}
        for line in result.stdout.splitlines():
            words = line.split()
            m = re.match(r"(\d+)", words[0]) if len(words) >= 3 else None
            if m:
                states[m.group(1)] = words[-2]
        # qstat exits non-zero when some ids are unknown (ended); that is an answer.
        # With nothing listed, only "unknown job" proves that they are gone: exit 153
        # (Torque-on-Slurm prints nothing with it) or the text; PBS Pro with job
        # history (Gadi) says "Job has finished, use -x or -H ...".
        text = _output(result)
        gone = result.returncode == 153 or bool(
            re.search(
                r"unknown job|invalid job|does not exist|has finished", text, re.I
            )
        )
        if result.returncode != 0 and not states and not gone:
            raise JobError(f"qstat failed (exit {result.returncode}): {text}")
        return states
