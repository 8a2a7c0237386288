"""Job directories: atomic creation, provenance, result records."""

from __future__ import annotations

import datetime as dt
import json
import re

import pytest

import nemotron
from nemotron.artifacts import jobdir


def test_create_is_complete_and_atomic(tmp_path):
    info = jobdir.provenance("pretrain", ["nemotron", "nano3", "pretrain"], ["a.b=1"], "/r/tiny.yaml")
    path = jobdir.create_job_dir(tmp_path / "runs" / "pretrain" / "x", config_yaml="a: 1\n", info=info)
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "job.json"]
    assert (path / "config.yaml").read_text() == "a: 1\n"
    job = jobdir.read_job(path)
    assert job["overrides"] == ["a.b=1"] and job["config_source"] == "/r/tiny.yaml"
    assert job["package_version"] == nemotron.__version__
    assert job["python"] and "hostname" in job and "torch" in job
    dt.datetime.fromisoformat(job["start_time"])
    assert [p.name for p in path.parent.iterdir()] == ["x"]  # no temporary directory left


def test_provenance_records_packages_and_the_launch_environment_but_no_credentials(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("WANDB_PROJECT", "p")
    monkeypatch.setenv("WANDB_API_KEY", "do-not-record")
    monkeypatch.setenv("HF_TOKEN", "do-not-record")
    monkeypatch.setenv("NEMOTRON_AUTH_TOKEN", "do-not-record")
    info = jobdir.provenance("pretrain", ["nemotron"], [], None)
    env = info["environment"]
    assert env["WORLD_SIZE"] == "8" and env["NCCL_DEBUG"] == "INFO" and env["WANDB_PROJECT"] == "p"
    assert "do-not-record" not in json.dumps(info)
    import numpy

    assert info["packages"]["numpy"] == numpy.__version__


def test_existing_dir_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(jobdir.JobDirError, match="already exists"):
        jobdir.create_job_dir(tmp_path / "x", config_yaml="", info={})


def test_git_commit_of_a_checkout(tmp_path):
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "f").write_text("1")
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "PATH": __import__("os").environ["PATH"],
    }
    subprocess.run(["git", "-C", str(tmp_path), "add", "f"], check=True, env=env)
    subprocess.run(["git", "-C", str(tmp_path), "commit", "-qm", "c"], check=True, env=env)
    info = jobdir.git_info(tmp_path)
    assert info is not None and re.fullmatch(r"[0-9a-f]{40}", info.commit) and info.dirty is False
    (tmp_path / "f").write_text("2")
    assert jobdir.git_info(tmp_path).dirty is True
    outside = tmp_path.parent / "not-a-repo"
    outside.mkdir(exist_ok=True)
    assert jobdir.git_info(outside) is None or jobdir.git_info(outside).commit != info.commit


def test_default_names_sort_by_time_and_are_unique():
    t = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    a, b = jobdir.default_job_dir("pretrain", "runs", t), jobdir.default_job_dir("pretrain", "runs", t)
    assert a.parent.as_posix() == "runs/pretrain" and a.name.startswith("20260102-030405-")
    assert a != b


def test_finish_writes_result(tmp_path):
    jobdir.finish_job_dir(tmp_path, "completed", {"steps": 3})
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["status"] == "completed" and result["steps"] == 3 and "end_time" in result
