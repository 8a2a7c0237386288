"""One run at a time saves into a checkpoint directory (`claim_save_dir`): a second run given
the same `checkpoint.save` is refused before it builds anything, naming the holder; the lock
goes with its holder however it ends (kill -9 included); holding the directory lets a start
remove the unfinished save a killed run left, which no later save may ever replace."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import nemotron.train.trainer as trainer_module
from nemotron.train import pretrain
from nemotron.train.checkpoint import (
    LATEST_FILE,
    MANIFEST_FILE,
    SAVE_LOCK_FILE,
    CheckpointError,
    claim_save_dir,
    finish_interrupted_saves,
)

from .conftest import make_config

HOLDER = textwrap.dedent(
    """
    import sys, time
    from nemotron.train.checkpoint import claim_save_dir
    claim = claim_save_dir(sys.argv[1], job=sys.argv[2])
    print("held", flush=True)
    time.sleep(600)
    """
)


def hold_in_another_process(save, job):
    """A process holding `save` as a training run does (until it is killed)."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(save), str(job)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def test_a_second_run_into_a_held_save_dir_is_refused_naming_the_holder(corpus, tmp_path, monkeypatch):
    """While another run holds `checkpoint.save` (past the wait), a run is refused before
    anything is built or written (no job dir, no checkpoint); once the holder is killed (-9: no
    cleanup of its own), the next run trains there and leaves no lock file."""
    monkeypatch.setattr(trainer_module, "SAVE_DIR_WAIT_S", 0.5)
    cfg = make_config(tmp_path, blend=corpus[0], train={"train_iters": 3})
    save = tmp_path / "ckpt"
    holder = hold_in_another_process(save, tmp_path / "first-job")
    try:
        started = time.monotonic()
        with pytest.raises(CheckpointError) as refused:
            pretrain(cfg, tmp_path / "second-job")
        assert time.monotonic() - started >= 0.5
        message = str(refused.value)
        assert f"checkpoint.save={save} is in use by another training run" in message
        assert "still after 0.5 s" in message
        assert f"pid {holder.pid} on " in message and f"job {tmp_path / 'first-job'}" in message
        assert "give this run another checkpoint.save" in message
        assert sorted(p.name for p in save.iterdir()) == [SAVE_LOCK_FILE]
        assert not (tmp_path / "second-job").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    summary = pretrain(cfg, tmp_path / "third-job")  # the kernel released the dead holder's lock
    assert summary.steps == 3 and summary.checkpoint.endswith("iter_0000003")
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000003", LATEST_FILE]


def test_a_starting_run_waits_for_a_holder_that_ends(corpus, tmp_path, monkeypatch):
    """A requeued job may start while its predecessor's lock is still held (a crashed NFS
    client's, until its lease expires): the start waits (`SAVE_DIR_WAIT_S`) and trains once it
    is released, rather than failing the job."""
    monkeypatch.setattr(trainer_module, "SAVE_DIR_WAIT_S", 60.0)
    cfg = make_config(tmp_path, blend=corpus[0], train={"train_iters": 3})
    holder = hold_in_another_process(tmp_path / "ckpt", tmp_path / "first-job")
    killer = threading.Timer(1.5, holder.send_signal, (signal.SIGKILL,))
    killer.start()
    started = time.monotonic()
    try:
        summary = pretrain(cfg, tmp_path / "job")
    finally:
        killer.join()
        holder.wait()
    assert time.monotonic() - started >= 1.5
    assert summary.steps == 3 and summary.status == "completed", summary


def test_the_lock_is_held_for_the_whole_run_and_released_at_its_end(corpus, tmp_path):
    """Held from set-up to the summary (a step in the middle of the run is refused to another
    claimant), and let go at the end: a claim right after succeeds."""
    cfg = make_config(tmp_path, blend=corpus[0], train={"train_iters": 3})
    seen = []

    def on_event(kind, payload):
        if kind == "train" and payload["step"] == 2:
            with pytest.raises(CheckpointError, match="in use by another training run"):
                claim_save_dir(cfg.checkpoint.save)
            seen.append(kind)

    pretrain(cfg, tmp_path / "job", on_event=on_event)
    assert seen == ["train"]
    claim = claim_save_dir(cfg.checkpoint.save)
    assert claim.locked
    claim.release()
    claim.release()  # idempotent
    assert not (tmp_path / "ckpt" / SAVE_LOCK_FILE).exists()


def test_a_refused_set_up_lets_go_of_the_save_dir(corpus, tmp_path):
    """A run that fails during set-up (here: a blend that does not exist) releases the
    directory: nothing is held by a run that never started."""
    cfg = make_config(tmp_path, blend=tmp_path / "missing.json")
    with pytest.raises(Exception):
        pretrain(cfg, tmp_path / "job")
    claim = claim_save_dir(cfg.checkpoint.save)
    assert claim.locked
    claim.release()


def test_an_unfinished_save_of_a_killed_run_is_removed_at_the_next_start(corpus, tmp_path):
    """A run killed mid-save at step N leaves `.tmp-iter_N` without a manifest (it can be as
    large as a checkpoint). Resumed with a save interval that never reaches N again, or not
    past N, nothing would ever remove it; the next start, holding the directory, does."""
    cfg = make_config(tmp_path, blend=corpus[0], train={"train_iters": 3})
    pretrain(cfg, tmp_path / "job")
    save = tmp_path / "ckpt"
    unfinished = save / ".tmp-iter_0000005"
    (unfinished / "rng").mkdir(parents=True)
    (unfinished / "rng" / "rank_00000.pt").write_bytes(b"x" * 4096)
    (unfinished / "__0_0.distcp").write_bytes(b"half a shard")

    summary = pretrain(cfg, tmp_path / "job2")
    assert summary.resumed_from.endswith("iter_0000003") and summary.steps == 3
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000003", LATEST_FILE]


def test_finish_interrupted_saves_removes_unfinished_saves_only_when_claimed(tmp_path):
    """Without the claim (another process may be writing that `.tmp-iter_N` now) an unfinished
    save is left; with it, it goes; a complete hidden one is published either way."""
    save = tmp_path / "save"
    (save / ".tmp-iter_0000002").mkdir(parents=True)
    complete = save / ".tmp-iter_0000001"
    complete.mkdir()
    (complete / MANIFEST_FILE).write_text("{}")
    assert finish_interrupted_saves(save) == ["iter_0000001"]
    assert sorted(p.name for p in save.iterdir()) == [".tmp-iter_0000002", "iter_0000001", LATEST_FILE]
    assert finish_interrupted_saves(save, claimed=True) == []
    assert sorted(p.name for p in save.iterdir()) == ["iter_0000001", LATEST_FILE]


def test_a_file_system_without_locks_trains_unguarded_with_a_warning(corpus, tmp_path, monkeypatch):
    """Where flock fails as unsupported (some network file system mounts) the run goes on,
    warns that a second run would not be noticed, and leaves an unfinished save alone (it
    cannot know that nobody is writing it); no lock file stays behind."""
    import fcntl

    real_flock = fcntl.flock

    def no_locks(fd, operation):
        if operation & fcntl.LOCK_EX:
            raise OSError(errno.ENOLCK, "No locks available")
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", no_locks)
    save = tmp_path / "ckpt"
    (save / ".tmp-iter_0000009").mkdir(parents=True)
    cfg = make_config(tmp_path, blend=corpus[0], train={"train_iters": 3})
    summary = pretrain(cfg, tmp_path / "job")
    (warning,) = [w for w in summary.warnings if "cannot lock" in w]
    assert str(save / SAVE_LOCK_FILE) in warning and f"checkpoint.save={save}" in warning
    assert sorted(p.name for p in save.iterdir()) == [".tmp-iter_0000009", "iter_0000003", LATEST_FILE]


def _cli_pretrain(corpus, tmp_path, monkeypatch, save, job):
    """`nemotron nano3 pretrain -c tiny` on the test corpus into `save`, job dir `job`."""
    from typer.testing import CliRunner

    from nemotron.cli.main import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEMOTRON_CACHE_DIR", str(tmp_path / "cache"))
    args = ["nano3", "pretrain", "-c", "tiny", f"data.blend={corpus[0]}", f"checkpoint.save={save}"]
    return CliRunner().invoke(app, [*args, "--job-dir", str(job)])


def test_the_cli_refuses_a_held_save_dir_in_one_line(corpus, tmp_path, monkeypatch):
    """Through the CLI: one error line naming the key and the holder, exit code 1."""
    monkeypatch.setattr(trainer_module, "SAVE_DIR_WAIT_S", 0.0)
    save = tmp_path / "ckpt"
    holder = hold_in_another_process(save, tmp_path / "first-job")
    try:
        result = _cli_pretrain(corpus, tmp_path, monkeypatch, save, tmp_path / "job")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert result.exit_code == 1, result.output
    err = result.stderr.strip()
    assert "Traceback" not in result.output and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and f"checkpoint.save={save} is in use by another training run" in err
    assert f"pid {holder.pid}" in err
    assert json.loads((tmp_path / "job" / "result.json").read_text())["status"] == "failed"


def test_the_holder_record_says_who_holds_it(tmp_path):
    """The lock file names the holder (pid, host, start, job) for the refused run's message."""
    claim = claim_save_dir(tmp_path / "save", job=tmp_path / "job")
    try:
        record = json.loads((tmp_path / "save" / SAVE_LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["job"] == str(tmp_path / "job")
        assert time.strftime("%Y-%m-%d", time.gmtime()) in record["started"] and record["host"]
    finally:
        claim.release()


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_lock_path_that_is_not_a_lock_file_is_refused_and_nothing_is_written_through_it(tmp_path, kind):
    # A symbolic link at SAVE/.lock was followed: the holder record was written over the file
    # it pointed at (any file the user could write).
    save = tmp_path / "save"
    save.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    if kind == "symlink":
        (save / SAVE_LOCK_FILE).symlink_to(victim)
    else:
        os.mkfifo(save / SAVE_LOCK_FILE)
    reason = "a symbolic link" if kind == "symlink" else "not a regular file"
    with pytest.raises(
        CheckpointError, match=rf"checkpoint.save={save}: cannot lock {save / SAVE_LOCK_FILE}: {reason}"
    ):
        claim_save_dir(save, job=tmp_path / "job")
    assert victim.read_text() == "precious\n"


def test_a_job_dir_inside_a_checkpoint_or_under_a_checkpoint_name_is_refused(corpus, tmp_path):
    # A job dir named like a checkpoint of the save dir was replaced (deleted) by the run's own
    # save, which then read as damaged; one inside a checkpoint made that checkpoint damaged.
    from nemotron.train.checkpoint import job_dir_problem

    cfg = make_config(tmp_path, blend=corpus[0], train={"train_iters": 2})
    save = tmp_path / "ckpt"
    (save / "iter_0000002").mkdir(parents=True)
    (save / "iter_0000002" / MANIFEST_FILE).write_text("{}")
    for job, words in (
        (save / "iter_0000008", f"{save / 'iter_0000008'} is a name the checkpoints of checkpoint.save"),
        (save / ".tmp-iter_0000004" / "job", "is a name the checkpoints"),
        (save / LATEST_FILE, "is a name the checkpoints"),
        (save / "iter_0000002" / "myjob", f"inside the checkpoint {save / 'iter_0000002'}"),
    ):
        assert words in (job_dir_problem(job, save) or ""), job
        with pytest.raises(CheckpointError, match="give the run another job dir"):
            pretrain(cfg, job)
        assert not job.exists()
    # Beside the checkpoints, and the save dir itself, are apart.
    assert job_dir_problem(save / "job", save) is None and job_dir_problem(save, save) is None
    assert job_dir_problem(tmp_path / "job", save) is None and job_dir_problem(tmp_path / "job", None) is None


def test_the_cli_refuses_a_job_dir_under_a_checkpoint_name_before_making_it(corpus, tmp_path, monkeypatch):
    save = tmp_path / "ckpt"
    job = save / "iter_0000008"
    result = _cli_pretrain(corpus, tmp_path, monkeypatch, save, job)
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert "Traceback" not in result.output and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --job-dir {job}: {job} is a name the checkpoints of checkpoint.save")
    assert not save.exists()


def test_a_save_dir_that_is_a_checkpoint_is_refused_naming_its_parent(corpus, tmp_path):
    # Given a checkpoint as checkpoint.save, the run's own .lock made that checkpoint read as
    # damaged ("it does not list .lock"), and a kill left it so for good.
    cfg = make_config(tmp_path, blend=corpus[0], train={"train_iters": 2})
    summary = pretrain(cfg, tmp_path / "first")
    checkpoint = tmp_path / "ckpt" / "iter_0000002"
    assert summary.checkpoint == str(checkpoint)
    for save in (checkpoint, checkpoint / "sub"):
        again = make_config(
            tmp_path, blend=corpus[0], train={"train_iters": 2}, checkpoint={"save": str(save)}
        )
        with pytest.raises(
            CheckpointError,
            match=rf"checkpoint.save={save} is (inside )?the checkpoint {checkpoint}, not a directory of checkpoints: give the directory that holds them \({checkpoint.parent}\)",
        ):
            pretrain(again, tmp_path / f"job-{save.name}")
    assert not (checkpoint / SAVE_LOCK_FILE).exists() and not (checkpoint / "sub").exists()
