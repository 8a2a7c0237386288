"""The stage commands' --run/--batch/--dry-run options, wired to nemotron.launch."""

from __future__ import annotations

import re
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
                     "--job-dir", str(workdir / "job"),
                     "train.micro_batch_size=1"])  # global batch 16 on 16 data-parallel ranks  # fmt: skip
    assert result.exit_code == 0, result.output
    assert set(workdir.rglob("*")) == before
    out = result.output
    assert "#SBATCH --nodes=2" in out and "#SBATCH --gpus-per-node=8" in out
    assert "#SBATCH --account=llm" in out and "export WANDB_PROJECT=nemotron" in out
    assert "--container-image nvcr.io/nvidia/pytorch:25.01-py3" in out
    assert "--nnodes 2 --nproc-per-node 8" in out
    assert "-m nemotron.cli.main nano3 pretrain -c /nemo_run/code/config.yaml" in out


def test_dry_run_with_a_local_profile_prints_the_torchrun_command(workdir):
    result = invoke(
        ["nano3", "pretrain", "-c", "tiny", "--run", "laptop", "--dry-run", "train.micro_batch_size=8"]
    )
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


@pytest.mark.parametrize(
    "overrides, message",
    [
        # tiny's one micro-batch of 16 cannot split over 2 data-parallel ranks
        ([], r"train\.global_batch_size: 16 is not divisible by train\.micro_batch_size \* DP = 16\*2"),
        (["train.micro_batch_size=8", "model.tensor_model_parallel_size=3"], r"not divisible by TP\*CP\*PP"),
        (["train.micro_batch_size=8", "model.expert_model_parallel_size=4"], r"expert_model_parallel_size=4"),
        (
            ["model.context_parallel_size=2", "train.seq_length=130"],
            r"train\.seq_length=130 must be a positive multiple of 4",
        ),
    ],
)
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_layout_the_profile_cannot_run_is_refused_before_submission(workdir, overrides, message, dry_run):
    """What the job would fail on at its start on the profile's world size (2 processes of
    'laptop'): refused at once, naming the profile and its file, with nothing written and
    nothing started (the job would otherwise wait in the queue only to fail)."""
    before = set(workdir.rglob("*"))
    args = ["nano3", "pretrain", "-c", "tiny", "--run", "laptop", *overrides]
    result = invoke(args + (["--dry-run"] if dry_run else []))
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: --run laptop ({workdir / 'env.toml'}): 2 processes: ")
    assert re.search(message, result.output) and len(result.output.strip().splitlines()) == 1
    assert set(workdir.rglob("*")) == before


@pytest.mark.parametrize("stage", [["pretrain", "train.micro_batch_size=8"], ["data", "prep", "pretrain"]])
@pytest.mark.parametrize("dry_run", [True, False])
def test_batch_with_a_local_profile_is_refused_before_a_job_dir_exists(workdir, stage, dry_run):
    """A local job cannot outlive the command: refused before the dry run shows a plan that
    would not be submitted, and before a job dir (config.yaml + job.json) is left behind."""
    before = set(workdir.rglob("*"))
    result = invoke(["nano3", *stage, "-c", "tiny", "--batch", "laptop"] + (["-d"] if dry_run else []))
    assert result.exit_code == 1, result.output
    assert "profile 'laptop' runs locally" in result.output and "--batch" in result.output
    assert set(workdir.rglob("*")) == before
