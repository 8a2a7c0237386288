"""What a `--run`/`--batch` submission will run: a stage, a resolved config, a profile, a job dir.

The job runs the same `nemotron` entry point (`python -m nemotron.cli.main <stage> -c CONFIG`)
with the resolved config file written by the CLI, so what runs is what `--dry-run` showed.
"""

from __future__ import annotations

import os
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from nemotron.config.env_toml import Profile, WandbSettings
from nemotron.data.config import PREP_TASKS_ENV


class LaunchError(RuntimeError):
    """A submission that cannot be built, submitted or followed."""


@dataclass(frozen=True)
class StageSpec:
    """How one CLI stage runs as a job."""

    cli: tuple[str, ...]  # the `nemotron` subcommand words
    distributed: bool  # started by torchrun (one process per GPU / nproc_per_node)
    whole_node: bool  # one process given every CPU of its (exclusive) node


STAGES: dict[str, StageSpec] = {
    "pretrain": StageSpec(cli=("nano3", "pretrain"), distributed=True, whole_node=False),
    "data_prep": StageSpec(cli=("nano3", "data", "prep", "pretrain"), distributed=False, whole_node=True),
}

EXPERIMENT_TITLE = "nemotron"
# Variables the CLI inside the job reads: the submission's job dir and the profile that ran it.
JOB_DIR_ENV = "NEMOTRON_JOB_DIR"
PROFILE_ENV = "NEMOTRON_PROFILE"


@dataclass(frozen=True)
class LaunchPlan:
    stage: str
    profile: Profile
    job_dir: Path  # the submitting side's job dir (holds the resolved config)
    config_path: Path  # the resolved config, on the submitting machine
    python: str  # interpreter that runs the entry point in the job
    nproc_per_node: int  # processes per node (torchrun) for distributed stages, else 1
    nodes: int
    env_vars: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None  # None: NeMo-Run's job code directory
    rdzv_id: int = 0
    # Slurm tasks per node: 1 for torchrun stages (torchrun starts the processes); for data
    # prep, the profile's ntasks_per_node tasks share each node's CPUs.
    tasks_per_node: int = 1

    @property
    def tasks(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def spec(self) -> StageSpec:
        return STAGES[self.stage]

    @property
    def experiment_id(self) -> str:
        # NeMo-Run splits ids at the last "_" into title and suffix, so the suffix has none.
        suffix = re.sub(r"[^A-Za-z0-9.-]", "-", f"{self.stage}-{self.job_dir.name}")
        return f"{EXPERIMENT_TITLE}_{suffix}"

    @property
    def task_name(self) -> str:
        return self.stage.replace("_", "-")

    @property
    def nemo_run_dir(self) -> Path:
        """Where NeMo-Run keeps this submission (sbatch script, code, logs) on this machine."""
        return self.job_dir / "launch"

    @property
    def task_dir(self) -> Path:
        """The job's own directory on this machine (logs, sbatch script, packaged config)."""
        return self.nemo_run_dir / "experiments" / EXPERIMENT_TITLE / self.experiment_id / self.task_name

    @property
    def remote_task_dir(self) -> str:
        """The job's directory where it runs (on the cluster's filesystem for an SSH tunnel)."""
        if self.profile.is_slurm and self.profile.tunnel == "ssh":
            base = f"{self.profile.remote_job_dir}/{EXPERIMENT_TITLE}"
            return f"{base}/{self.experiment_id}/{self.task_name}"
        return str(self.task_dir)

    def job_config_path(self) -> str:
        """The config path as the job sees it."""
        if self.profile.is_slurm:
            # Packaged into the job's code dir; NeMo-Run mounts the task dir at /nemo_run in a
            # container and substitutes the real path without one.
            return f"/nemo_run/code/{self.config_path.name}"
        return str(self.config_path)

    def entry_args(self) -> list[str]:
        """Arguments after `python -m nemotron.cli.main`."""
        return [*self.spec.cli, "-c", self.job_config_path()]


def check_detachable(profile: Profile, attached: bool) -> None:
    """`--batch` (detached) needs a Slurm profile: a local job cannot outlive the command."""
    if not attached and not profile.is_slurm:
        raise LaunchError(
            f"profile '{profile.name}' runs locally; a local job cannot outlive this "
            f'command, so use --run (attached) or a profile with executor = "slurm" for --batch'
        )


def processes(stage: str, profile: Profile) -> tuple[int, int, int]:
    """(nodes, torchrun processes per node, Slurm tasks per node) of `stage` under `profile`."""
    if stage not in STAGES:
        raise LaunchError(f"unknown stage '{stage}'; stages: {', '.join(sorted(STAGES))}")
    if STAGES[stage].distributed:
        nproc = profile.nproc_per_node or profile.gpus_per_node or profile.ntasks_per_node
        return profile.nodes, nproc, 1
    if profile.is_slurm:
        # Data prep: nodes x ntasks_per_node tasks share the work units (claims on the shared
        # filesystem); task 0 assembles the output.
        return profile.nodes, 1, profile.ntasks_per_node
    return 1, 1, 1


def world_size(stage: str, profile: Profile) -> int:
    """Processes of a distributed stage's job under `profile` (its training world size)."""
    nodes, nproc, _ = processes(stage, profile)
    return nodes * nproc


def build_launch_plan(
    stage: str,
    resolved_config_path: Path | str,
    profile: Profile,
    job_dir: Path | str,
    wandb: WandbSettings | None = None,
) -> LaunchPlan:
    """Plan the job that runs `stage` with `resolved_config_path` under `profile`.

    `job_dir` is the submission's directory on this machine (the CLI writes the resolved config
    there); NeMo-Run's files go to `job_dir/launch`. Nothing is written here.
    """
    if stage not in STAGES:
        raise LaunchError(f"unknown stage '{stage}'; stages: {', '.join(sorted(STAGES))}")
    config_path = Path(resolved_config_path).resolve()
    job_dir = Path(job_dir).resolve()
    if not config_path.is_file():
        raise LaunchError(f"resolved config {config_path} does not exist")

    on_this_filesystem = not profile.is_slurm or (
        profile.tunnel == "local" and profile.container_image is None
    )
    python = profile.python or (sys.executable if on_this_filesystem else "python")

    nodes, nproc, tasks_per_node = processes(stage, profile)

    env: dict[str, str] = {}
    if wandb is not None:
        env.update(wandb.env_vars())
    env.update(profile.env_vars)
    if Path(python).is_absolute():
        # torchrun is found on PATH in the job; take the one beside the interpreter. A Slurm
        # job script expands $PATH itself; a local process gets this machine's PATH spelled out.
        tail = "$PATH" if profile.is_slurm else os.environ.get("PATH", "/usr/bin:/bin")
        env["PATH"] = f"{Path(python).parent}:{tail}"
    env[PROFILE_ENV] = profile.name

    workdir = profile.workdir
    if workdir is None and on_this_filesystem:
        workdir = str(Path.cwd())

    plan = LaunchPlan(
        stage=stage,
        profile=profile,
        job_dir=job_dir,
        config_path=config_path,
        python=python,
        nproc_per_node=nproc,
        nodes=nodes,
        env_vars=env,
        workdir=workdir,
        # A fixed rendezvous id per job dir keeps the rendered script reproducible.
        rdzv_id=zlib.crc32(str(job_dir).encode()) % 100000,
        tasks_per_node=tasks_per_node,
    )
    if plan.tasks > 1:
        plan.env_vars[PREP_TASKS_ENV] = "slurm"
    if on_this_filesystem:
        plan.env_vars[JOB_DIR_ENV] = str(job_dir)
    elif profile.container_image is not None:
        plan.env_vars[JOB_DIR_ENV] = "/nemo_run"  # the task dir, mounted into the container
    else:
        plan.env_vars[JOB_DIR_ENV] = plan.remote_task_dir
    return plan


def select_profile(run_profile: str | None, batch_profile: str | None) -> tuple[str, bool] | None:
    """`--run P` / `--batch P` as (profile name, attached); None when neither was given.

    The two are exclusive: one submission is either followed to its end or left running.
    """
    if run_profile is not None and batch_profile is not None:
        raise LaunchError(
            f"--run {run_profile} and --batch {batch_profile} are exclusive: --run submits and "
            f"waits (streaming logs), --batch submits and returns; give one"
        )
    if run_profile is not None:
        return run_profile, True
    if batch_profile is not None:
        return batch_profile, False
    return None
