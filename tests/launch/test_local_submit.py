"""Attached submission through NeMo-Run's local executor (a real process, streamed logs)."""

from __future__ import annotations

import textwrap

import pytest

from nemotron.config.env_toml import load_env_toml
from nemotron.launch import LaunchError, build_launch_plan, submit


def _plan(tmp_path, fake_python, name="job1"):
    (tmp_path / "env.toml").write_text(
        textwrap.dedent(
            f"""
            [wandb]
            project = "proj"
            entity = "team"

            [laptop]
            python = "{fake_python}"
            env_vars = {{ FAKE_RC = "0" }}

            [failing]
            extends = "laptop"
            env_vars = {{ FAKE_RC = "3" }}
            """
        )
    )
    env = load_env_toml(tmp_path / "env.toml")
    job_dir = tmp_path / "runs" / name
    job_dir.mkdir(parents=True)
    (job_dir / "config.yaml").write_text("sample: 7\n")
    return env, job_dir


def test_local_run_streams_logs_and_returns_the_state(tmp_path, fake_python, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env, job_dir = _plan(tmp_path, fake_python)
    plan = build_launch_plan("data_prep", job_dir / "config.yaml", env.profile("laptop"), job_dir, env.wandb)
    lines: list[str] = []
    result = submit(plan, attached=True, log_sink=lines.append)
    assert result.state == "SUCCEEDED" and result.succeeded
    text = "\n".join(lines)
    assert f"ARGS -m nemotron.cli.main nano3 data prep pretrain -c {job_dir}/config.yaml" in text
    assert f"CWD {tmp_path}" in text
    assert f"JOB_DIR {job_dir}" in text and "PROFILE laptop" in text
    assert "WANDB proj/team" in text and "CONFIG sample: 7" in text
    with pytest.raises(LaunchError, match="already submitted"):
        submit(plan, attached=True)


def test_local_run_reports_failure(tmp_path, fake_python, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env, job_dir = _plan(tmp_path, fake_python, "job2")
    plan = build_launch_plan("data_prep", job_dir / "config.yaml", env.profile("failing"), job_dir, env.wandb)
    result = submit(plan, attached=True)
    assert result.state == "FAILED" and not result.succeeded
