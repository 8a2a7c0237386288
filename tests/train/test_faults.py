"""Checkpoints and runs that must not be lost, through the real CLI (issue 17): damaged
checkpoints (given by name, or found by auto-resume), a full disk during a save, an unwritable
save directory, a changed schedule on resume, RNG seeding.

Every bad-input case asserts the exit code, one `error:` line naming the file or key, no
traceback, the job dir's result.json/error.txt, and that the earlier outputs are byte-identical
afterwards (SHA-256 of every file)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from nemotron.cli.main import app
from nemotron.config import dump_config
from nemotron.train import pretrain
from nemotron.train.checkpoint import LATEST_FILE
from nemotron.train.metrics import read_metrics

from .conftest import make_config

FSIZE_RUNNER = Path(__file__).with_name("_fsize_runner.py")


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """`nemotron nano3 pretrain -c <cfg as YAML> --job-dir JOB [overrides]`, in this process."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEMOTRON_CACHE_DIR", str(tmp_path / "cli-cache"))
    monkeypatch.delenv("NEMOTRON_JOB_DIR", raising=False)
    monkeypatch.delenv("RANK", raising=False)

    def invoke(cfg, job: Path, *overrides: str):
        recipe = job.parent / f"{job.name}.yaml"
        recipe.write_text(dump_config(cfg))
        return CliRunner().invoke(
            app, ["nano3", "pretrain", "-c", str(recipe), "--job-dir", str(job), *overrides]
        )

    return invoke


def assert_one_line_failure(result, job: Path | None, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    if job is not None:
        assert json.loads((job / "result.json").read_text())["status"] == "failed"
        assert (job / "error.txt").is_file()
    return lines[0]


def result_of(job: Path) -> dict:
    return json.loads((job / "result.json").read_text())


@pytest.fixture(scope="module")
def saved_run(corpus, tmp_path_factory):
    """An 8-step run with checkpoints at steps 3, 6 and 8 (latest), copied by each test."""
    root = tmp_path_factory.mktemp("saved")
    cfg = make_config(root, blend=corpus[0])
    pretrain(cfg, root / "job")
    return root / "ckpt"


def copy_save(saved_run: Path, tmp_path: Path) -> Path:
    save = tmp_path / "ckpt"
    shutil.copytree(saved_run, save)
    return save


DAMAGE = {  # part -> glob inside a checkpoint
    "distcp": "__*.distcp",
    "metadata": ".metadata",
    "rng": "rng/rank_00000.pt",
}


def damage(checkpoint: Path, part: str, how: str) -> Path:
    """Truncate a file to half its size, or overwrite it with zeros (same size)."""
    target = next(checkpoint.glob(DAMAGE[part]))
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if how == "truncated" else bytes(len(data)))
    return target


damages = pytest.mark.parametrize(
    "part,how", [(part, how) for part in DAMAGE for how in ("truncated", "zeroed")]
)


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints


@damages
def test_verify_names_the_damaged_file(saved_run, tmp_path, part, how):
    from nemotron.train.checkpoint import MANIFEST_FILE, verify_checkpoint

    save = copy_save(saved_run, tmp_path)
    manifest = json.loads((save / "iter_0000008" / MANIFEST_FILE).read_text())["files"]
    every_file = {
        str(p.relative_to(save / "iter_0000008"))
        for p in (save / "iter_0000008").rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE
    }
    assert set(manifest) == every_file  # the manifest, written last, covers every other file
    assert verify_checkpoint(save / "iter_0000008") == []
    target = damage(save / "iter_0000008", part, how)
    (problem,) = verify_checkpoint(save / "iter_0000008")
    assert str(target) in problem
    assert ("bytes" in problem) == (how == "truncated")  # zeroed: only the checksum sees it


@damages
def test_damaged_checkpoint_given_by_name_fails_in_one_line(cli, corpus, saved_run, tmp_path, part, how):
    save = copy_save(saved_run, tmp_path)
    target = damage(save / "iter_0000008", part, how)
    before = tree_hashes(save)
    cfg = make_config(
        tmp_path,
        blend=corpus[0],
        checkpoint={"load": str(save / "iter_0000008"), "save": str(tmp_path / "new")},
    )
    job = tmp_path / "job"
    if how == "truncated":
        # a file of the wrong size is found by the CLI's check of `checkpoint.load` (sizes
        # only), before any job dir is made
        assert_one_line_failure(cli(cfg, job), None, str(target), "damaged")
        assert not job.exists()
    else:  # same sizes: the run's own verification (checksums) stops it, in its job dir
        assert_one_line_failure(cli(cfg, job), job, str(target), "damaged")
    assert tree_hashes(save) == before
    assert not (job / "metrics.jsonl").exists() or not [r for r in read_metrics(job) if r["kind"] == "train"]


@damages
def test_auto_resume_falls_back_to_the_newest_intact_checkpoint(cli, corpus, saved_run, tmp_path, part, how):
    from nemotron.train.checkpoint import verify_checkpoint

    save = copy_save(saved_run, tmp_path)
    target = damage(save / "iter_0000008", part, how)
    intact = tree_hashes(save / "iter_0000006")
    cfg = make_config(tmp_path, blend=corpus[0], checkpoint={"save": str(save)})
    job = tmp_path / "job"
    result = cli(cfg, job)
    assert result.exit_code == 0, result.output
    summary = result_of(job)
    assert summary["status"] == "completed" and summary["resumed_from"] == str(save / "iter_0000006")
    (warning,) = summary["warnings"]
    assert "iter_0000008" in warning and str(target) in warning
    assert "skipped damaged checkpoint" in result.stdout
    assert tree_hashes(save / "iter_0000006") == intact
    assert verify_checkpoint(save / "iter_0000008") == []  # re-saved from the resumed run


def test_no_intact_checkpoint_refuses_to_start_over(cli, corpus, saved_run, tmp_path):
    save = copy_save(saved_run, tmp_path)
    for step, part in ((3, "rng"), (6, "metadata"), (8, "distcp")):
        damage(save / f"iter_{step:07d}", part, "zeroed")
    before = tree_hashes(save)
    cfg = make_config(tmp_path, blend=corpus[0], checkpoint={"save": str(save)})
    job = tmp_path / "job"
    assert_one_line_failure(
        cli(cfg, job), job, "no intact checkpoint", "iter_0000003", "iter_0000006", "iter_0000008"
    )
    assert tree_hashes(save) == before


# ---------------------------------------------------------------------------------------------
# Storage: a full disk, an unwritable directory


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str):
    """A tmpfs at `path` (root with mount rights only; the test is skipped otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.parametrize("limit", ["full-filesystem", "file-size-limit"])
def test_full_disk_during_save_fails_in_one_line_and_keeps_the_previous_checkpoint(
    cli, corpus, saved_run, tmp_path, limit
):
    from nemotron.train.checkpoint import verify_checkpoint

    with contextlib.ExitStack() as stack:
        if limit == "full-filesystem":  # room for iter_3 and part of the next checkpoint only
            size = sum(p.stat().st_size for p in (saved_run / "iter_0000003").rglob("*") if p.is_file())
            save = stack.enter_context(mounted_tmpfs(tmp_path / "small", f"size={size * 3 // 2}"))
        else:
            save = tmp_path / "ckpt"
            save.mkdir()
        shutil.copytree(saved_run / "iter_0000003", save / "iter_0000003")
        (save / LATEST_FILE).write_text("iter_0000003\n")
        before = tree_hashes(save)
        cfg = make_config(tmp_path, blend=corpus[0], checkpoint={"save": str(save)})
        job = tmp_path / "job"
        recipe = tmp_path / "job.yaml"
        recipe.write_text(dump_config(cfg))
        # file-size-limit: writes of any file past half a model shard fail with EFBIG, as
        # writes on a full disk fail with ENOSPC; the runner sets the limit after its imports.
        shard = next(saved_run.glob("iter_0000003/__*.distcp")).stat().st_size
        max_bytes = shard // 2 if limit == "file-size-limit" else 0
        proc = subprocess.run(
            [
                sys.executable,
                str(FSIZE_RUNNER),
                str(max_bytes),
                "nano3",
                "pretrain",
                "-c",
                str(recipe),
                "--job-dir",
                str(job),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            env={**os.environ, "NEMOTRON_CACHE_DIR": str(tmp_path / "cli-cache")},
        )
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stdout + proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        for needle in (
            "error: ",
            "iter_0000006",
            str(save),
            "MiB were free there",
            f"the previous checkpoint {save / 'iter_0000003'} is intact",
        ):
            assert needle in line, line
        if limit == "full-filesystem":  # (torch's zip writer reports EFBIG as a bad position)
            assert "No space left on device" in line, line
        assert result_of(job)["status"] == "failed" and (job / "error.txt").is_file()
        assert tree_hashes(save) == before  # nothing half-written left beside it
        assert verify_checkpoint(save / "iter_0000003") == []


@pytest.mark.parametrize("where", ["parent-is-a-file", "read-only-filesystem", "no-permission"])
def test_unwritable_save_dir_fails_before_any_step(cli, corpus, tmp_path, where):
    with contextlib.ExitStack() as stack:
        if where == "parent-is-a-file":
            (tmp_path / "a-file").write_text("not a directory")
            save = tmp_path / "a-file" / "ckpt"
        elif where == "read-only-filesystem":
            save = stack.enter_context(mounted_tmpfs(tmp_path / "ro", "ro,size=1m")) / "ckpt"
        else:
            if os.geteuid() == 0:
                pytest.skip("root writes into any directory")
            locked = tmp_path / "locked"
            locked.mkdir(mode=0o555)
            save = locked / "ckpt"
        cfg = make_config(tmp_path, blend=corpus[0], checkpoint={"save": str(save)})
        job = tmp_path / "job"
        assert_one_line_failure(cli(cfg, job), job, f"checkpoint.save={save}", "not writable")
        assert not (job / "metrics.jsonl").exists()  # failed at set-up: no model, no step
        assert not save.exists()


# ---------------------------------------------------------------------------------------------
# A changed schedule on resume


def test_changed_schedule_on_resume_is_refused_by_default(cli, corpus, saved_run, tmp_path):
    save = copy_save(saved_run, tmp_path)
    before = tree_hashes(save)
    cfg = make_config(tmp_path, blend=corpus[0], checkpoint={"save": str(save)}, train={"train_iters": 12})
    job = tmp_path / "job"
    assert_one_line_failure(
        cli(cfg, job),
        job,
        str(save / "iter_0000008"),
        "total_tokens 512 -> 768",
        "scheduler.on_resume=checkpoint",
        "scheduler.on_resume=config",
    )
    assert tree_hashes(save) == before


@pytest.mark.parametrize("policy", ["checkpoint", "config"])
def test_changed_schedule_on_resume_policies(corpus, saved_run, tmp_path, policy):
    from nemotron.train.schedule import LRSchedule

    save = copy_save(saved_run, tmp_path)
    cfg = make_config(
        tmp_path,
        blend=corpus[0],
        checkpoint={"save": str(save)},
        train={"train_iters": 12},
        scheduler={"on_resume": policy},
    )
    summary = pretrain(cfg, tmp_path / "job")
    assert summary.steps == 12 and summary.resumed_from.endswith("iter_0000008")
    (warning,) = summary.warnings
    assert f"scheduler.on_resume={policy}" in warning and "total_tokens 512 -> 768" in warning
    tokens = 4 * 16
    old = LRSchedule.from_config(cfg.scheduler, cfg.optimizer, 8 * tokens)
    new = LRSchedule.from_config(cfg.scheduler, cfg.optimizer, 12 * tokens)
    expected = old if policy == "checkpoint" else new
    train = {r["step"]: r for r in read_metrics(tmp_path / "job") if r["kind"] == "train"}
    assert [train[s]["lr"] for s in range(9, 13)] == [expected.rate((s - 1) * tokens) for s in range(9, 13)]
    assert old.rate(10 * tokens) != new.rate(10 * tokens)  # the two really differ
    saved = json.loads((save / "iter_0000012" / "train_state.json").read_text())["schedule"]
    assert LRSchedule.from_dict(saved) == expected  # and the choice sticks for later resumes


def test_unchanged_rates_resume_without_a_word(corpus, saved_run, tmp_path):
    """A longer run whose remaining steps get the same rates (here: a constant schedule)."""
    save = tmp_path / "ckpt"
    cfg = make_config(
        tmp_path, blend=corpus[0], checkpoint={"save": str(save)}, scheduler={"style": "constant"}
    )
    pretrain(cfg, tmp_path / "job")
    longer = make_config(
        tmp_path,
        blend=corpus[0],
        checkpoint={"save": str(save)},
        scheduler={"style": "constant"},
        train={"train_iters": 10},
    )
    summary = pretrain(longer, tmp_path / "job2")
    assert summary.steps == 10 and summary.warnings == []


def test_a_checkpoint_past_a_shorter_train_iters_is_said(corpus, saved_run, tmp_path):
    """Resuming the 8-step run's checkpoint with train.train_iters 5 trains nothing (Megatron's
    loop also just ends): said, not silently reported as a completed run."""
    save = copy_save(saved_run, tmp_path)
    cfg = make_config(tmp_path, blend=corpus[0], checkpoint={"save": str(save)}, train={"train_iters": 5})
    summary = pretrain(cfg, tmp_path / "job")
    assert summary.status == "completed" and summary.steps == 8
    (warning,) = summary.warnings
    assert (
        "iter_0000008 is at step 8, past this run's 5 steps (train.train_iters): nothing is trained"
        in warning
    )
    assert "only the final evaluation runs" in warning
    same = make_config(tmp_path, blend=corpus[0], checkpoint={"save": str(save)})
    assert pretrain(same, tmp_path / "job2").warnings == []  # a finished run run again: nothing to say


def test_a_warmup_as_long_as_the_run_is_said(corpus, tmp_path):
    """Megatron refuses warmup >= the run (it asserts warmup < decay samples); a short trial of
    a recipe keeping its long warmup is allowed here, but said: the rate never peaks or decays."""
    cfg = make_config(tmp_path, blend=corpus[0], train={"train_iters": 2}, scheduler={"warmup_tokens": 256})
    summary = pretrain(cfg, tmp_path / "job")  # 2 steps x 64 tokens, half the warmup
    (warning,) = summary.warnings
    assert "scheduler.warmup_tokens (256) is not below the run's 128 tokens" in warning
    assert "still warming up when the run ends (0.0015 there, of optimizer.lr 0.003)" in warning
    cfg = make_config(tmp_path, blend=corpus[0], train={"train_iters": 3}, scheduler={"warmup_tokens": 128})
    cfg.checkpoint.save = str(tmp_path / "ckpt3")
    assert pretrain(cfg, tmp_path / "job3").warnings == []


def test_changed_optimizer_settings_on_resume_are_refused_by_default(cli, corpus, saved_run, tmp_path):
    """torch's optimizer load_state_dict takes weight decay, betas and eps from the checkpoint:
    a resumed run whose config changes them would silently keep the old ones. Refused (one
    line naming each value) unless scheduler.on_resume says which to keep."""
    save = copy_save(saved_run, tmp_path)
    before = tree_hashes(save)
    cfg = make_config(
        tmp_path,
        blend=corpus[0],
        checkpoint={"save": str(save)},
        optimizer={"weight_decay": 0.05, "beta2": 0.99},
    )
    assert_one_line_failure(
        cli(cfg, tmp_path / "job"),
        tmp_path / "job",
        str(save / "iter_0000008"),
        "optimizer.weight_decay 0.1 -> 0.05",
        "optimizer.beta2 0.95 -> 0.99",
        "scheduler.on_resume=checkpoint",
        "scheduler.on_resume=config",
    )
    assert tree_hashes(save) == before
    for policy in ("checkpoint", "config"):
        cfg.scheduler.on_resume = policy
        summary = pretrain(cfg, tmp_path / f"job-{policy}")
        (warning,) = summary.warnings
        assert f"scheduler.on_resume={policy}" in warning and "optimizer.weight_decay 0.1 -> 0.05" in warning


# ---------------------------------------------------------------------------------------------
# RNG


def test_python_and_numpy_rngs_are_seeded_by_train_seed_and_restored(corpus, tmp_path):
    def rng_after_run(name: str, seed: int, disturbance: int) -> dict:
        random.seed(disturbance)  # whatever the caller's process did before
        np.random.seed(disturbance)
        cfg = make_config(tmp_path / name, blend=corpus[0], train={"seed": seed, "train_iters": 3})
        pretrain(cfg, tmp_path / name / "job")
        return torch.load(
            tmp_path / name / "ckpt" / "iter_0000003" / "rng" / "rank_00000.pt", weights_only=False
        )

    a, b, other = rng_after_run("a", 1234, 1), rng_after_run("b", 1234, 2), rng_after_run("c", 7, 1)
    assert a["python"] == b["python"] and a["python"] != other["python"]
    assert all(np.array_equal(x, y) for x, y in zip(a["numpy"], b["numpy"]))
    assert not np.array_equal(a["numpy"][1], other["numpy"][1])

    # A resumed run continues from the saved states, not from the seed.
    random.seed(99)
    np.random.seed(99)
    cfg = make_config(
        tmp_path / "a",
        blend=corpus[0],
        train={"seed": 1234, "train_iters": 3},
        checkpoint={"save": str(tmp_path / "a" / "ckpt")},
    )
    from nemotron.models.nano3.model import Nano3ForCausalLM
    from nemotron.train.checkpoint import load_checkpoint

    load_checkpoint(tmp_path / "a" / "ckpt", Nano3ForCausalLM(cfg.model.arch()))
    assert random.getstate() == a["python"]
    assert np.array_equal(np.random.get_state()[1], a["numpy"][1])
