"""Execution: env.toml profiles turned into NeMo-Run jobs (local torchrun or Slurm).

`build_launch_plan(stage, resolved_config_path, profile, job_dir, wandb)` plans a job,
`render(plan)` is the `--dry-run` text, `submit(plan, attached, log_sink)` runs it.
"""

from nemotron.config.env_toml import (
    EnvToml,
    EnvTomlError,
    Profile,
    WandbSettings,
    find_env_toml,
    load_env_toml,
    load_profile,
)
from nemotron.launch.plan import (
    STAGES,
    LaunchError,
    LaunchPlan,
    build_launch_plan,
    check_detachable,
    processes,
    select_profile,
    world_size,
)
from nemotron.launch.submit import JobResult, render, submit

__all__ = [
    "STAGES",
    "EnvToml",
    "EnvTomlError",
    "JobResult",
    "LaunchError",
    "LaunchPlan",
    "Profile",
    "WandbSettings",
    "build_launch_plan",
    "check_detachable",
    "find_env_toml",
    "load_env_toml",
    "load_profile",
    "processes",
    "render",
    "select_profile",
    "submit",
    "world_size",
]
