"""The CI cluster scripts (.ci/slurm) leave the machine as they found it: teardown removes
exactly what setup recorded and stops only the daemons it started; setup never runs beside (or
stops) a Slurm cluster that already runs. The full cycle runs in CI (`.ci/slurm/run_tests.sh`);
these checks need no Slurm packages."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

CI = Path(__file__).resolve().parents[2] / ".ci" / "slurm"


def env_for(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "SLURM_CI_STATE": str(tmp_path / "state"),
        "SLURM_CI_SSH_DIR": str(tmp_path / "ssh"),
    }


def fake_daemon(tmp_path: Path, name: str) -> subprocess.Popen:
    """A process whose name (/proc/PID/comm) is `name`: a copy of `sleep`."""
    binary = tmp_path / "bin" / name
    binary.parent.mkdir(exist_ok=True)
    shutil.copy(shutil.which("sleep"), binary)
    return subprocess.Popen([str(binary), "300"])


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_pass_shellcheck():
    scripts = sorted(str(p) for p in CI.glob("*.sh"))
    done = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, cwd=CI.parents[1])
    assert done.returncode == 0, done.stdout


def test_teardown_removes_what_setup_recorded_and_stops_only_its_daemons(tmp_path):
    state, ssh = tmp_path / "state", tmp_path / "ssh"
    (state / "run").mkdir(parents=True)
    ours = fake_daemon(tmp_path, "slurmdbd")
    foreign = fake_daemon(tmp_path, "slurmctld")  # a recorded pid now held by something else
    bystander = tmp_path / "not-ours.conf"
    bystander.write_text("someone else's")
    created_dir = tmp_path / "etc-slurm"
    created_dir.mkdir()
    created_conf = created_dir / "slurmdbd.conf"
    created_conf.write_text("StoragePass=secret\n")
    ssh.mkdir()
    (ssh / "id_ed25519.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAItest nemotron-ci\n")
    (state / "run" / "slurmdbd.pid").write_text(str(ours.pid))
    (state / "run" / "slurmctld.pid").write_text(str(foreign.pid))
    (state / "pids").write_text(
        f"{state}/run/slurmdbd.pid slurmdbd\n{state}/run/slurmctld.pid slurmd\n"
    )  # name does not match
    (state / "created").write_text(f"{created_dir}\n{created_conf}\n{ssh}\n")
    try:
        done = subprocess.run(
            [str(CI / "teardown.sh")], capture_output=True, text=True, env=env_for(tmp_path), timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert ours.wait(timeout=20) == -signal.SIGTERM
        assert foreign.poll() is None  # not the recorded daemon: left alone
        assert not state.exists() and not created_dir.exists() and not ssh.exists()
        assert bystander.read_text() == "someone else's"
        again = subprocess.run(
            [str(CI / "teardown.sh")], capture_output=True, text=True, env=env_for(tmp_path), timeout=60
        )
        assert again.returncode == 0 and "nothing to do" in again.stdout
    finally:
        for proc in (ours, foreign):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="setup.sh needs root")
def test_setup_refuses_to_run_beside_a_running_cluster(tmp_path):
    running = fake_daemon(tmp_path, "slurmd")
    try:
        done = subprocess.run(
            [str(CI / "setup.sh")], capture_output=True, text=True, env=env_for(tmp_path), timeout=60
        )
        assert done.returncode == 1
        assert f"slurmd already runs on this machine (pid {running.pid})" in done.stderr
        assert running.poll() is None  # not stopped
        assert not (tmp_path / "state").exists()  # nothing created
    finally:
        running.kill()
        running.wait()
