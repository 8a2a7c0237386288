"""NeMo-Run executors and tasks for a `LaunchPlan` (local torchrun, or Slurm through a tunnel)."""

from __future__ import annotations

import getpass
import os
import re

import nemo_run as run

from nemotron.launch.plan import LaunchPlan

ENTRY_MODULE = "nemotron.cli.main"


def build_task(plan: LaunchPlan) -> run.Script:
    """`python -m nemotron.cli.main <stage words> -c CONFIG` (torchrun replaces `python`)."""
    return run.Script(path=ENTRY_MODULE, m=True, args=plan.entry_args(), entrypoint=plan.python)


def build_executor(plan: LaunchPlan) -> run.LocalExecutor | run.SlurmExecutor:
    profile = plan.profile
    launcher = run.Torchrun(rdzv_id=plan.rdzv_id) if plan.spec.distributed else None
    if not profile.is_slurm:
        return run.LocalExecutor(
            ntasks_per_node=plan.nproc_per_node, launcher=launcher, env_vars=dict(plan.env_vars)
        )

    base_dir = str(plan.nemo_run_dir / "experiments")
    if profile.tunnel == "ssh":
        # NeMo-Run copies the job's directory (with the packaged config) to remote_job_dir.
        tunnel = run.SSHTunnel(
            host=profile.host,
            port=profile.port,
            user=profile.user or getpass.getuser(),
            identity=os.path.expanduser(profile.identity) if profile.identity else None,
            job_dir=profile.remote_job_dir,
        )
    else:
        tunnel = run.LocalTunnel(job_dir=base_dir)
    packager = _config_packager(plan)

    env = {name: _job_script_value(value) for name, value in plan.env_vars.items()}
    srun_args: list[str] = []
    if plan.workdir is not None:
        flag = "--container-workdir" if profile.container_image else "--chdir"
        srun_args += [flag, plan.workdir]
    if plan.spec.whole_node:
        # The node's tasks share every CPU of the exclusive node (srun reads this variable; the
        # job script exports it unquoted, so Slurm's value is substituted).
        if plan.tasks_per_node == 1:
            env["SRUN_CPUS_PER_TASK"] = "$SLURM_CPUS_ON_NODE"
        else:
            env["SRUN_CPUS_PER_TASK"] = (
                str(profile.cpus_per_task)
                if profile.cpus_per_task
                else f"$((SLURM_CPUS_ON_NODE/{plan.tasks_per_node}))"
            )

    return run.SlurmExecutor(
        account=profile.account,
        partition=profile.partition,
        job_name_prefix="nemotron-",
        time=profile.time,
        nodes=plan.nodes,
        ntasks_per_node=plan.tasks_per_node,  # torchrun is the node's only task; data prep: see plan
        torchrun_nproc_per_node=plan.nproc_per_node if plan.spec.distributed else None,
        gpus_per_node=None if plan.spec.whole_node else profile.gpus_per_node,
        cpus_per_task=None if plan.spec.whole_node else profile.cpus_per_task,
        mem=profile.mem,
        exclusive=True if (plan.spec.whole_node or profile.exclusive) else None,
        container_image=profile.container_image,
        container_mounts=list(profile.mounts),
        setup_lines="\n".join(profile.setup) if profile.setup else None,
        srun_args=srun_args or None,
        env_vars=env,
        tunnel=tunnel,
        packager=packager,
        launcher=launcher,
        poll_estimated_start_time=False,
    )


# Characters that mean the same to the shell unquoted: a value of only these is written as is
# (`$` kept: `$PATH`, `${HOME}` expand either way).
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_./:,=+@%${}-]*")


def _job_script_value(value: str) -> str:
    """`value` as the Slurm job script must spell it: NeMo-Run writes `export NAME=<value>`
    unquoted, so a space or `;` would end the value (and run the rest as a command). Wrapped in
    double quotes, everything stays literal except `$` expansions, as in the profile's `setup`."""
    if _PLAIN_VALUE.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`")
    return f'"{escaped}"'


def _config_packager(plan: LaunchPlan) -> run.PatternPackager:
    """Ships the resolved config into the job's code directory (`/nemo_run/code/NAME`)."""
    return run.PatternPackager(
        include_pattern=str(plan.config_path), relative_path=str(plan.config_path.parent)
    )
