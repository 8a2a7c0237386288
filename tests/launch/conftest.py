"""Fixtures for launch tests; `slurm` tests need a running cluster and must be asked for.

Tests marked `slurm` run only when selected with `-m slurm` (the `.ci/slurm/run_tests.sh`
stage does) or with NEMOTRON_SLURM_TESTS=1, and are skipped when no cluster answers (failed
instead with NEMOTRON_SLURM_REQUIRED=1, as the CI stage sets), so the default suite never needs
(or waits for) Slurm.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest


def _asked_for_slurm(config) -> bool:
    markexpr = config.getoption("-m") or ""
    return os.environ.get("NEMOTRON_SLURM_TESTS") == "1" or (
        "slurm" in markexpr and "not slurm" not in markexpr
    )


def pytest_collection_modifyitems(config, items):
    if _asked_for_slurm(config):
        return
    skip = pytest.mark.skip(reason="Slurm tests run with -m slurm (see .ci/slurm/run_tests.sh)")
    for item in items:
        if "slurm" in item.keywords:
            item.add_marker(skip)


def unavailable(reason: str) -> None:
    """Skip, or fail when the CI stage that started the cluster requires it."""
    if os.environ.get("NEMOTRON_SLURM_REQUIRED") == "1":
        pytest.fail(f"required Slurm setup missing: {reason}")
    pytest.skip(reason)


def _default_partition() -> str | None:
    out = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return None
    for line in out.stdout.splitlines():
        part, state = line.split()
        if part.endswith("*") and state in ("idle", "mixed", "allocated"):
            return part.rstrip("*")
    return None


@pytest.fixture(scope="session", autouse=True)
def nemorun_home(tmp_path_factory):
    """NeMo-Run keeps its job registry under $NEMORUN_HOME (~/.nemo_run); tests use their own."""
    home = tmp_path_factory.mktemp("nemorun-home")
    import nemo_run.config as nr_config
    from nemo_run.run.torchx_backend.schedulers import local as nr_local
    from nemo_run.run.torchx_backend.schedulers import slurm as nr_slurm

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEMORUN_HOME", str(home))  # for CLI subprocesses
        mp.setattr(nr_config, "_NEMORUN_HOME", str(home))
        mp.setattr(nr_slurm, "SLURM_JOB_DIRS", str(home / ".slurm_jobs"))
        mp.setattr(nr_local, "LOCAL_JOB_DIRS", str(home / ".local_jobs.json"))
        yield home


@pytest.fixture(scope="session")
def slurm_cluster() -> dict[str, str]:
    """Account and partition of a running cluster whose accounting (sacct) answers."""
    if shutil.which("sbatch") is None or shutil.which("sacct") is None:
        unavailable("no Slurm client tools (run .ci/slurm/setup.sh)")
    partition = _default_partition()
    if partition is None:
        unavailable("no Slurm cluster answers (run .ci/slurm/setup.sh)")
    if subprocess.run(["sacct", "-n", "-X"], capture_output=True, timeout=30).returncode != 0:
        unavailable("Slurm accounting (sacct) does not answer")
    return {"account": os.environ.get("SLURM_CI_ACCOUNT", "ci"), "partition": partition}


CI_SSH_KEY = Path("/var/lib/nemotron-ci-ssh/id_ed25519")


@pytest.fixture
def ci_ssh_key() -> Path:
    """The key of the sshd .ci/slurm/setup.sh starts on 127.0.0.1:$SLURM_CI_SSH_PORT."""
    if not CI_SSH_KEY.is_file():
        unavailable("no CI sshd (started by .ci/slurm/setup.sh)")
    return CI_SSH_KEY


@pytest.fixture
def fake_python(tmp_path) -> Path:
    """An interpreter stand-in: prints its arguments, cwd, env and the config, sleeps $FAKE_SLEEP
    seconds, waits (up to 300 s) for the file $FAKE_RELEASE when it is set, and exits $FAKE_RC.

    Named *python* because NeMo-Run only runs `-m` modules through an interpreter called so.
    """
    path = tmp_path / "bin" / "fakepython"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        textwrap.dedent(
            """\
            #!/bin/bash
            echo "ARGS $*"
            echo "CWD $(pwd)"
            echo "JOB_DIR $NEMOTRON_JOB_DIR"
            echo "PROFILE $NEMOTRON_PROFILE"
            echo "WANDB $WANDB_PROJECT/$WANDB_ENTITY"
            echo "CPUS $(nproc)"
            echo "CONFIG $(cat "${@: -1}")"
            sleep "${FAKE_SLEEP:-0}"
            for _ in $(seq 3000); do [ -z "${FAKE_RELEASE:-}" ] || [ -e "$FAKE_RELEASE" ] && break; sleep 0.1; done
            exit "${FAKE_RC:-0}"
            """
        )
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path
