"""The stage commands' --run/--batch/--dry-run options, wired to nemotron.launch."""

from __future__ import annotations

import textwrap

import pytest
from typer.testing import CliRunner

from nemotron.cli.main import app

ENV = """
[wandb]
project = "nemotron"

[cluster]
executor = "slurm"
account = "llm"
partition = "batch"
nodes = 2
gpus_per_node = 8
container_image = "nvcr.io/nvidia/pytorch:25.01-py3"
mounts = ["/lustre:/lustre"]

[laptop]
nproc_per_node = 2
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "env.toml").write_text(textwrap.dedent(ENV))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NEMOTRON_JOB_DIR", raising=False)
    return tmp_path


def invoke(args):
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("stage", [["pretrain"], ["data", "prep", "pretrain"]])
def test_run_and_batch_are_exclusive(workdir, stage):
    result = invoke(["nano3", *stage, "-c", "tiny", "--run", "cluster", "--batch", "cluster"])
    assert result.exit_code == 2
    assert "exclusive" in result.output
    assert not (workdir / "runs").exists()


def test_dry_run_with_a_slurm_profile_prints_the_sbatch_script_and_writes_nothing(workdir):
    before = set(workdir.rglob("*"))
    result = invoke(["nano3", "pretrain", "-c", "tiny", "--batch", "cluster", "--dry-run",
                     "--job-dir", str(workdir / "job")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert set(workdir.rglob("*")) == before
    out = result.output
    assert "#SBATCH --nodes=2" in out and "#SBATCH --gpus-per-node=8" in out
    assert "#SBATCH --account=llm" in out and "export WANDB_PROJECT=nemotron" in out
    assert "--container-image nvcr.io/nvidia/pytorch:25.01-py3" in out
    assert "--nnodes 2 --nproc-per-node 8" in out
    assert "-m nemotron.cli.main nano3 pretrain -c /nemo_run/code/config.yaml" in out


def test_dry_run_with_a_local_profile_prints_the_torchrun_command(workdir):
    result = invoke(["nano3", "pretrain", "-c", "tiny", "--run", "laptop", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "--nproc-per-node 2" in result.output and "torchrun" in result.output
    assert not (workdir / "runs").exists()


def test_unknown_profile_lists_the_profiles(workdir):
    result = invoke(["nano3", "pretrain", "-c", "tiny", "--run", "clustr", "--dry-run"])
    assert result.exit_code == 1
    assert "no profile 'clustr'" in result.output and "cluster, laptop" in result.output


def test_missing_env_toml_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / ".git").mkdir()
    monkeypatch.chdir(tmp_path)
    result = invoke(["nano3", "pretrain", "-c", "tiny", "--run", "cluster", "--dry-run"])
    assert result.exit_code == 1 and "no env.toml found" in result.output
