"""The walking skeleton through the real CLI: tiny data prep -> tiny pretrain -> checkpoint ->
resume, which continues at the next step and lands exactly where an uninterrupted run does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nemotron.cli.main import app

pytestmark = pytest.mark.slow

TINY_TRAIN = [
    "train.eval_interval=2",
    "train.eval_iters=1",
    "train.log_interval=1",
    "checkpoint.save_interval=2",
    "logger.progress_bar=false",
    "train.micro_batch_size=8",  # two micro-batches per step: accumulation crosses the resume too
]


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"nemotron {' '.join(args)} failed:\n{result.output}"
    return result.output


def result_of(job_dir: Path) -> dict:
    result = json.loads((job_dir / "result.json").read_text())
    assert result["status"] == "completed"
    return result


def test_prep_train_checkpoint_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEMOTRON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NEMOTRON_JOB_DIR", raising=False)

    # data prep on the tiny recipe: embedded corpus + tokenizer, no network
    out = run_cli("nano3", "data", "prep", "pretrain", "-c", "tiny", "--job-dir", str(tmp_path / "prep"))
    blend = tmp_path / "output/nano3/stage0_pretrain_tiny/blend.json"
    assert blend.is_file(), out
    assert "building the embedded corpus" in out
    # Again: the embedded assets and the output are cached, and the CLI does not claim to build.
    again = run_cli(
        "nano3", "data", "prep", "pretrain", "-c", "tiny", "--job-dir", str(tmp_path / "prep-again")
    )
    assert "building the embedded corpus" not in again and result_of(tmp_path / "prep-again")["cached"]
    splits = json.loads(blend.read_text())
    assert set(splits) == {"train", "valid", "test"}
    for prefixes in splits.values():
        for prefix in prefixes[1::2]:
            assert Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()

    # an uninterrupted 6-step run ...
    straight = tmp_path / "straight"
    run_cli("nano3", "pretrain", "-c", "tiny", "--job-dir", str(straight), "train.train_iters=6", *TINY_TRAIN)
    full = result_of(straight)
    assert full["steps"] == 6 and full["tokens"] == 6 * 16 * 128
    assert full["final_loss"] is not None and full["final_loss"] < 9.0  # below ln(4096) ~ 8.3 + slack

    # ... against 4 steps, a checkpoint, and a resume to 6
    first = tmp_path / "first"
    out = run_cli(
        "nano3", "pretrain", "-c", "tiny", "--job-dir", str(first), "train.train_iters=4", *TINY_TRAIN
    )
    part = result_of(first)
    assert part["steps"] == 4 and part["checkpoint"], out
    assert Path(part["checkpoint"]).exists()
    assert Path(part["checkpoint"]).is_relative_to(first / "checkpoints")

    resumed = tmp_path / "resumed"
    out = run_cli(
        "nano3",
        "pretrain",
        "-c",
        "tiny",
        "--job-dir",
        str(resumed),
        "train.train_iters=6",
        f"checkpoint.load={first / 'checkpoints'}",
        *TINY_TRAIN,
    )
    rest = result_of(resumed)
    assert rest["steps"] == 6 and rest["tokens"] == full["tokens"], out
    assert rest.get("resumed_from"), out
    assert rest["final_loss"] == pytest.approx(full["final_loss"], rel=1e-4, abs=1e-5)
    for job in (straight, first, resumed):
        job_info = json.loads((job / "job.json").read_text())
        assert job_info["stage"] == "pretrain" and (job / "config.yaml").is_file()

    # README's job-directory table names everything a run (and `plot`) leaves there.
    run_cli("nano3", "plot", str(straight))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("## Job directories", 1)[1].split("\n## ", 1)[0]
    for entry in straight.iterdir():
        name = entry.name + ("/" if entry.is_dir() else "")
        assert f"`{name}`" in table, f"README's job-directory table does not list {name}"
