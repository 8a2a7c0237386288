"""Launch plans and the submissions `--dry-run` shows (generated sbatch script, local command)."""

from __future__ import annotations

import os
import shlex
import sys
import textwrap
from pathlib import Path

import pytest

from nemotron.config.env_toml import WandbSettings, load_env_toml
from nemotron.launch import LaunchError, build_launch_plan, render, select_profile, submit

ENV = """
[wandb]
project = "nemotron"
entity = "my-team"

[cluster]
executor = "slurm"
account = "llm"
partition = "batch"
nodes = 2
ntasks_per_node = 8
gpus_per_node = 8
cpus_per_task = 16
time = "04:00:00"
mem = "0"
container_image = "nvcr.io/nvidia/pytorch:25.01-py3"
mounts = ["/lustre:/lustre", "/scratch/hf:/root/.cache/huggingface"]
setup = ["module load cuda/12.8"]
env_vars = { NCCL_DEBUG = "WARN" }

[bare]
executor = "slurm"
account = "ci"
partition = "debug"
cpus_per_task = 2
time = "00:20:00"

[remote]
extends = "bare"
tunnel = "ssh"
host = "login.invalid"
user = "me"
remote_job_dir = "/lustre/me/jobs"

[laptop]
nproc_per_node = 2
"""


@pytest.fixture
def env(tmp_path):
    path = tmp_path / "env.toml"
    path.write_text(textwrap.dedent(ENV))
    return load_env_toml(path)


@pytest.fixture
def job(tmp_path):
    job_dir = tmp_path / "jobs" / "20260101-000000"
    job_dir.mkdir(parents=True)
    config = job_dir / "config.yaml"
    config.write_text("train:\n  train_iters: 2\n")
    return job_dir, config


def snapshot(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def sbatch_flags(script: str) -> dict[str, str | bool]:
    flags = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --") :].partition("=")
            flags[key] = value if value else True
    return flags


def srun_line(script: str) -> list[str]:
    lines = [ln for ln in script.splitlines() if ln.startswith("srun --output")]
    assert len(lines) == 1, script
    return shlex.split(lines[0], posix=True)


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_multi_node_gpu_sbatch_script_field_by_field(env, job, tmp_path):
    job_dir, config = job
    before = snapshot(tmp_path)
    plan = build_launch_plan("pretrain", config, env.profile("cluster"), job_dir, env.wandb)
    script = render(plan)
    assert snapshot(tmp_path) == before, "--dry-run must write nothing"
    assert render(plan) == script, "the rendering is reproducible"

    task_dir = plan.task_dir
    assert task_dir == job_dir / "launch" / "experiments" / "nemotron" / plan.experiment_id / "pretrain"
    assert sbatch_flags(script) == {
        "account": "llm",
        "partition": "batch",
        "nodes": "2",
        # torchrun is the one task per node; it starts the 8 GPU processes.
        "ntasks-per-node": "1",
        "gpus-per-node": "8",
        "cpus-per-task": "16",
        "mem": "0",
        "time": "04:00:00",
        "job-name": "nemotron-pretrain",
        "open-mode": "append",
        "output": f"{task_dir}/sbatch_nemotron-pretrain_%j.out",
    }

    exports = [ln for ln in script.splitlines() if ln.startswith("export ")]
    for expected in (
        "export WANDB_PROJECT=nemotron",
        "export WANDB_ENTITY=my-team",
        "export NCCL_DEBUG=WARN",
        "export NEMOTRON_PROFILE=cluster",
        "export NEMOTRON_JOB_DIR=/nemo_run",
    ):
        assert expected in exports
    assert "module load cuda/12.8" in script.splitlines()
    # The head node's address is resolved in the script for the rendezvous endpoint.
    assert 'head_node_ip=$(srun --nodes=1 --ntasks=1 -w "$head_node" hostname --ip-address)' in script

    argv = srun_line(script)
    assert option(argv, "--container-image") == "nvcr.io/nvidia/pytorch:25.01-py3"
    assert option(argv, "--container-mounts").split(",") == [
        "/lustre:/lustre",
        "/scratch/hf:/root/.cache/huggingface",
        f"{task_dir}:/nemo_run",
    ]
    assert option(argv, "--container-workdir") == "/nemo_run/code"
    assert option(argv, "--output") == f"{task_dir}/log-nemotron-pretrain_%j_${{SLURM_RESTART_COUNT:-0}}.out"
    cmd = argv[argv.index("torchrun") :]
    assert option(cmd, "--nnodes") == "2"
    assert option(cmd, "--nproc-per-node") == "8"
    assert option(cmd, "--rdzv-backend") == "c10d"
    assert option(cmd, "--rdzv-endpoint") == "$head_node_ip:29500"
    assert option(cmd, "--rdzv-id") == str(plan.rdzv_id)
    assert option(cmd, "--node-rank") == "$SLURM_NODEID"
    # The job runs the nemotron entry point on the config shipped into the job's code dir.
    assert cmd[cmd.index("-m") :] == [
        "-m", "nemotron.cli.main", "nano3", "pretrain", "-c", "/nemo_run/code/config.yaml",
    ]  # fmt: skip


def test_slurm_env_values_stay_one_word_in_the_job_script(env, job, tmp_path):
    """NeMo-Run writes `export NAME=value` unquoted: a value with a space or `;` must reach the
    job whole (not cut at the space, the rest run as a command); `$VAR` still expands."""
    import subprocess

    job_dir, config = job
    values = {"SPACED": "a b; echo INJECTED", "QUOTES": 'q"`x`\\z $', "PLAIN": "/x:$HOME"}
    profile = env.profile("bare").__class__(**{**vars(env.profile("bare")), "env_vars": values})
    script = render(build_launch_plan("pretrain", config, profile, job_dir, None))
    exports = [ln for ln in script.splitlines() if ln.startswith(tuple(f"export {k}=" for k in values))]
    assert len(exports) == 3
    assert "export PLAIN=/x:$HOME" in exports  # plain values are written as before
    shown = subprocess.run(
        ["bash", "-c", "\n".join([*exports, 'printf "%s\\n" "$SPACED" "$QUOTES" "$PLAIN"'])],
        capture_output=True,
        text=True,
        check=True,
        env={"HOME": "/home/me", "PATH": os.environ["PATH"]},
    ).stdout.splitlines()
    assert shown == ["a b; echo INJECTED", 'q"`x`\\z $', "/x:/home/me"]


def test_data_prep_takes_a_whole_node_without_torchrun(env, job):
    job_dir, config = job
    plan = build_launch_plan("data_prep", config, env.profile("bare"), job_dir, env.wandb)
    script = render(plan)
    flags = sbatch_flags(script)
    assert flags["exclusive"] is True and flags["nodes"] == "1"
    assert flags["ntasks-per-node"] == "1"
    assert "gpus-per-node" not in flags and "cpus-per-task" not in flags
    assert "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_ON_NODE" in script.splitlines()
    assert "NEMOTRON_PREP_TASKS" not in script  # one task: the prep runs alone
    argv = srun_line(script)
    assert "torchrun" not in argv
    assert argv[-8:] == [
        "-m", "nemotron.cli.main", "nano3", "data", "prep", "pretrain",
        "-c", f"{plan.task_dir}/code/config.yaml",
    ]  # fmt: skip


def test_data_prep_spreads_over_every_node_and_task(env, job):
    """nodes x ntasks_per_node Slurm tasks share the units; CPUs of a node split between its
    tasks; one failed task ends the step (a rerun redoes only its units)."""
    job_dir, config = job
    plan = build_launch_plan("data_prep", config, env.profile("cluster"), job_dir, env.wandb)
    assert (plan.nodes, plan.tasks_per_node, plan.tasks) == (2, 8, 16)
    script = render(plan)
    flags = sbatch_flags(script)
    assert flags["nodes"] == "2" and flags["ntasks-per-node"] == "8" and flags["exclusive"] is True
    assert "gpus-per-node" not in flags
    lines = script.splitlines()
    assert "export SRUN_CPUS_PER_TASK=16" in lines  # the profile's cpus_per_task
    assert "export NEMOTRON_PREP_TASKS=slurm" in lines
    argv = srun_line(script)
    # NeMo-Run's srun flags: a failed task ends the step (a rerun redoes only its units); the
    # other tasks get 60 s after the first one ends, so tasks stay until task 0 has finished.
    assert "--kill-on-bad-exit=1" in argv and "--wait=60" in argv and "torchrun" not in argv
    assert argv[-2:] == ["-c", "/nemo_run/code/config.yaml"]
    without_cpus = env.profile("cluster").__class__(**{**vars(env.profile("cluster")), "cpus_per_task": None})
    script = render(build_launch_plan("data_prep", config, without_cpus, job_dir, env.wandb))
    assert "export SRUN_CPUS_PER_TASK=$((SLURM_CPUS_ON_NODE/8))" in script.splitlines()


def test_slurm_without_container_runs_in_place_with_this_interpreter(env, job, monkeypatch, tmp_path):
    job_dir, config = job
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    plan = build_launch_plan("pretrain", config, env.profile("bare"), job_dir, None)
    script = render(plan)
    argv = srun_line(script)
    assert "--container-image" not in argv
    # NeMo-Run's /nemo_run placeholder becomes the real job dir; the job starts in the
    # submitting directory so relative paths in the config mean the same thing.
    assert argv[argv.index("--chdir", argv.index("--chdir") + 1) + 1] == str(workdir)
    assert argv[-2:] == ["-c", f"{plan.task_dir}/code/config.yaml"]
    assert option(argv[argv.index("torchrun") :], "--nproc-per-node") == "1"
    assert f"export PATH={Path(sys.executable).parent}:$PATH" in script.splitlines()
    assert f"export NEMOTRON_JOB_DIR={job_dir}" in script.splitlines()
    assert "WANDB_PROJECT" not in script


def test_ssh_tunnel_uses_remote_paths(env, job, tmp_path):
    job_dir, config = job
    before = snapshot(tmp_path)
    plan = build_launch_plan("pretrain", config, env.profile("remote"), job_dir, None)
    script = render(plan)
    assert snapshot(tmp_path) == before
    remote = f"/lustre/me/jobs/nemotron/{plan.experiment_id}/pretrain"
    assert plan.remote_task_dir == remote
    assert sbatch_flags(script)["output"] == f"{remote}/sbatch_nemotron-pretrain_%j.out"
    argv = srun_line(script)
    assert argv[-2:] == ["-c", f"{remote}/code/config.yaml"]
    assert argv[argv.index("--chdir") + 1] == f"{remote}/code"
    assert argv[argv.index("torchrun") - 1] == "--kill-on-bad-exit=1"
    assert str(tmp_path) not in script


def test_local_profile_renders_the_torchrun_command(env, job, tmp_path, monkeypatch):
    job_dir, config = job
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    plan = build_launch_plan("pretrain", config, env.profile("laptop"), job_dir, env.wandb)
    text = render(plan)
    assert snapshot(tmp_path) == before
    cd, cmd = text.strip().splitlines()
    assert cd == f"cd {tmp_path}"
    argv = shlex.split(cmd)
    env_words = argv[1 : argv.index("torchrun")]
    env_map = dict(w.split("=", 1) for w in env_words)
    assert env_map["WANDB_PROJECT"] == "nemotron" and env_map["NEMOTRON_JOB_DIR"] == str(job_dir)
    assert env_map["PATH"].startswith(f"{Path(sys.executable).parent}:")
    torchrun = argv[argv.index("torchrun") :]
    assert option(torchrun, "--nproc-per-node") == "2" and option(torchrun, "--nnodes") == "1"
    assert torchrun[torchrun.index("-m") :] == [
        "-m", "nemotron.cli.main", "nano3", "pretrain", "-c", str(config),
    ]  # fmt: skip


def test_local_data_prep_is_one_process(env, job):
    job_dir, config = job
    plan = build_launch_plan("data_prep", config, env.profile("laptop"), job_dir, None)
    argv = shlex.split(render(plan).strip().splitlines()[1])
    assert "torchrun" not in argv
    assert argv[argv.index(sys.executable) :] == [
        sys.executable, "-m", "nemotron.cli.main", "nano3", "data", "prep", "pretrain",
        "-c", str(config),
    ]  # fmt: skip


def test_run_and_batch_are_exclusive():
    assert select_profile("a", None) == ("a", True)
    assert select_profile(None, "b") == ("b", False)
    assert select_profile(None, None) is None
    with pytest.raises(LaunchError, match="--run a and --batch b are exclusive"):
        select_profile("a", "b")


def test_batch_needs_a_slurm_profile(env, job):
    job_dir, config = job
    plan = build_launch_plan("pretrain", config, env.profile("laptop"), job_dir, None)
    with pytest.raises(LaunchError, match="profile 'laptop' runs locally.*--run"):
        submit(plan, attached=False)


def test_plan_errors(env, job, tmp_path):
    job_dir, config = job
    with pytest.raises(LaunchError, match="unknown stage 'sft'"):
        build_launch_plan("sft", config, env.profile("laptop"), job_dir)
    with pytest.raises(LaunchError, match="does not exist"):
        build_launch_plan("pretrain", tmp_path / "missing.yaml", env.profile("laptop"), job_dir)


def test_wandb_settings_are_exported(env, job):
    job_dir, config = job
    plan = build_launch_plan("pretrain", config, env.profile("laptop"), job_dir, WandbSettings(project="p"))
    assert plan.env_vars["WANDB_PROJECT"] == "p" and "WANDB_ENTITY" not in plan.env_vars
    assert os.path.isabs(plan.python)
