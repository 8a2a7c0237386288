"""Job directories: every real run records what ran, from which code, with which config.

Layout (default `runs/<stage>/<UTC timestamp>-<id>`):
  config.yaml   the fully resolved config (loadable again with `-c <job dir>/config.yaml`)
  job.json      provenance: stage, argv, overrides, config source, package version, git commit
                (and whether the tree had local changes), start time, host, Python and torch,
                the versions of the packages a run's numbers depend on (`packages`) and the
                launch and library environment variables that change how it runs
                (`environment`; never credentials)
  result.json   written when the run ends: status, end time, and the stage's summary
The directory is assembled under a temporary name and renamed into place, so a job dir that
exists is complete.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import nemotron
from nemotron.utils.fs import apply_default_modes, atomic_write_text, temporary_dir

CONFIG_FILE = "config.yaml"
JOB_FILE = "job.json"
RESULT_FILE = "result.json"


class JobDirError(OSError):
    """A job directory that cannot be created (already exists, not writable)."""


@dataclass(frozen=True)
class GitInfo:
    commit: str
    dirty: bool


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def default_job_dir(stage: str, runs_dir: str | Path = "runs", now: _dt.datetime | None = None) -> Path:
    """`runs/<stage>/<YYYYmmdd-HHMMSS>-<6 hex>`: sortable by time, unique across parallel starts."""
    now = now or utc_now()
    return Path(runs_dir) / stage / f"{now.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def git_info(path: str | Path | None = None) -> GitInfo | None:
    """The commit of the git checkout holding `path` (default: this package's source), if any."""
    where = Path(path) if path is not None else Path(nemotron.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return GitInfo(commit=commit, dirty=bool(status.strip())) if commit else None


def package_version() -> str:
    try:
        return metadata.version("nemotron")
    except metadata.PackageNotFoundError:
        return nemotron.__version__


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# Distributions whose version can change a run's numbers or speed (absent ones are left out).
RECORDED_PACKAGES = ("numpy", "triton", "transformers", "tokenizers", "datasets", "wandb", "tensorboard")
# Environment variables that change how a run runs: the launcher's layout, the device and
# communication libraries, threads, and this package's own. Names that look like credentials
# are never recorded, whatever their prefix.
_ENV_PREFIXES = ("NEMOTRON_", "CUDA_", "NCCL_", "TORCH_", "PYTORCH_", "SLURM_JOB_", "WANDB_")
_ENV_NAMES = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "OMP_NUM_THREADS",
    "SLURM_NNODES",
    "SLURM_NTASKS",
)
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")


def recorded_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables job.json keeps (see `_ENV_PREFIXES`), sorted by name."""
    environ = dict(os.environ) if environ is None else environ
    return {
        name: value
        for name, value in sorted(environ.items())
        if (name in _ENV_NAMES or name.startswith(_ENV_PREFIXES))
        and not any(word in name.upper() for word in _SECRET_WORDS)
    }


def provenance(
    stage: str,
    argv: list[str],
    overrides: list[str],
    config_source: str | None,
    start: _dt.datetime | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    git = git_info()
    info: dict[str, Any] = {
        "stage": stage,
        "argv": list(argv),
        "overrides": list(overrides),
        "config_source": config_source,
        "package_version": package_version(),
        "git_commit": git.commit if git else None,
        "git_dirty": git.dirty if git else None,
        "start_time": (start or utc_now()).isoformat(),
        "hostname": platform.node(),
        "cwd": os.getcwd(),
        "python": sys.version.split()[0],
        "torch": _dist_version("torch"),
        "packages": {name: v for name in RECORDED_PACKAGES if (v := _dist_version(name)) is not None},
        "environment": recorded_environment(),
    }
    if extra:
        info.update(extra)
    return info


def create_job_dir(path: str | Path, *, config_yaml: str, info: dict[str, Any]) -> Path:
    """Create the job directory `path` with config.yaml and job.json, atomically.

    Raises JobDirError if `path` already exists or cannot be written.
    """
    path = Path(path).absolute()
    if path.exists():
        raise JobDirError(f"job directory {path} already exists; choose another --job-dir")
    try:
        tmp = temporary_dir(path, sweep=True)  # (what killed writers left there goes first)
    except OSError as exc:
        raise JobDirError(f"cannot create job directory {path}: {exc}") from None
    try:
        (tmp / CONFIG_FILE).write_text(config_yaml)
        (tmp / JOB_FILE).write_text(json.dumps(info, indent=2) + "\n")
        apply_default_modes(tmp)  # made 0700
        tmp.rename(path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if path.exists():
            raise JobDirError(f"job directory {path} already exists; choose another --job-dir") from None
        raise JobDirError(f"cannot create job directory {path}: {exc}") from None
    return path


def finish_job_dir(
    path: str | Path, status: str, result: dict[str, Any] | None = None, end: _dt.datetime | None = None
) -> Path:
    """Record how the run ended (`status`: completed | failed | interrupted) in result.json."""
    out = Path(path) / RESULT_FILE
    payload = {"status": status, "end_time": (end or utc_now()).isoformat(), **(result or {})}
    atomic_write_text(out, json.dumps(payload, indent=2, default=str) + "\n")
    return out


def read_job(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / JOB_FILE).read_text())
