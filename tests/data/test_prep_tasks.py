"""Several processes (Slurm tasks on one or many nodes) sharing one data prep.

The tasks here are local processes given their rank as Slurm would (`PrepTask`); the Slurm
stage (`tests/launch/test_slurm.py`) runs the same through `srun`. Checked: the output is
byte-identical to a one-process run, every task takes units, and after a task is killed
(with the step, as srun does) the rerun redoes only the unfinished units.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nemotron.data.config import DataPrepConfig, TokenizerConfig
from nemotron.data.prep import DataPrepError, PrepTask, run_data_prep

from .conftest import make_docs, write_jsonl

TASK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from nemotron.data.config import DataPrepConfig, TokenizerConfig
    from nemotron.data.prep import PrepTask, run_data_prep

    if __name__ == "__main__":
        root, out, tokenizer, rank, world, attempt = sys.argv[1:7]
        cfg = DataPrepConfig(blend_path=root + "/blend.json", output_dir=out,
                             tokenizer=TokenizerConfig(model=tokenizer), num_shards=3,
                             num_workers=1, work_unit_mb=0.01)
        task = PrepTask(rank=int(rank), world=int(world), attempt=attempt, host=f"node{rank}")
        result = run_data_prep(cfg, task=task)
        print(json.dumps({"here": result.units_done_here, "reused": result.units_reused}))
    """
)


def _comparable(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes().replace(str(root).encode(), b"OUT")
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "metadata.json"
    }


@pytest.fixture
def corpus(tmp_path):
    write_jsonl(tmp_path / "big.jsonl", make_docs(4000, seed=80))
    write_jsonl(tmp_path / "small.jsonl", make_docs(300, seed=81))
    (tmp_path / "blend.json").write_text(
        json.dumps(
            {
                "datasets": [
                    {"name": "big", "path": "big.jsonl", "weight": 1},
                    {"name": "small", "path": "small.jsonl", "weight": 2},
                ]
            }
        )
    )
    (tmp_path / "task.py").write_text(TASK_SCRIPT)
    return tmp_path


def _start(root: Path, out: Path, bpe_dir: Path, rank: int, world: int, attempt: str) -> subprocess.Popen:
    command = [
        sys.executable,
        str(root / "task.py"),
        str(root),
        str(out),
        str(bpe_dir),
        str(rank),
        str(world),
        attempt,
    ]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _finish(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def _one_process(root: Path, bpe_dir: Path, out: Path) -> None:
    run_data_prep(
        DataPrepConfig(
            blend_path=str(root / "blend.json"),
            output_dir=str(out),
            tokenizer=TokenizerConfig(model=str(bpe_dir)),
            num_shards=3,
            num_workers=2,
        )
    )


def test_two_tasks_share_the_units_and_write_the_same_bytes(corpus, bpe_dir):
    # Enough units that task 0 cannot finish them all before task 1 (which starts first and
    # waits for the plan) claims some, however the two processes are scheduled.
    write_jsonl(corpus / "big.jsonl", make_docs(20000, seed=80))
    out = corpus / "two-tasks"
    tasks = [_start(corpus, out, bpe_dir, rank, 2, "job-1") for rank in (1, 0)]
    follower, leader = (_finish(t) for t in tasks)
    metadata = json.loads((out / "metadata.json").read_text())
    units = sum(s["work_units"] for s in metadata["sources"])
    by_task = {t["rank"]: t["units"] for t in metadata["producer"]["tasks"]}
    assert by_task == {0: leader["here"], 1: follower["here"]}
    assert by_task[0] > 0 and by_task[1] > 0 and by_task[0] + by_task[1] == units
    assert {t["host"] for t in metadata["producer"]["tasks"]} == {"node0", "node1"}
    assert not (out / ".work").exists()

    _one_process(corpus, bpe_dir, corpus / "one")
    assert _comparable(out) == _comparable(corpus / "one")


def test_killed_task_then_rerun_redoes_only_unfinished_units(corpus, bpe_dir):
    out = corpus / "killed"
    leader = _start(corpus, out, bpe_dir, 0, 2, "job-1")
    follower = _start(corpus, out, bpe_dir, 1, 2, "job-1")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if len(list(out.glob(".work/*/units/*.done.json"))) >= 4:
            break
        assert leader.poll() is None and follower.poll() is None
        time.sleep(0.05)
    # Task 1 dies (kill -9); srun then ends the step's other tasks (--kill-on-bad-exit).
    os.killpg(follower.pid, signal.SIGKILL)
    os.killpg(leader.pid, signal.SIGKILL)
    for process in (leader, follower):
        process.communicate()
    assert not (out / "metadata.json").exists()
    (work,) = [p for p in (out / ".work").iterdir() if p.name not in ("CURRENT", "attempts")]
    finished = {p.name for p in (work / "units").glob("*.done.json")}
    claimed = {p.name for p in (work / "claims" / "job-1").iterdir()}
    assert finished and len(claimed) > len(finished)  # units were in flight when it died
    total = len(json.loads((work / "plan.json").read_text())["units"])

    # The rerun (a new attempt, here with one task more) reuses the finished units.
    reruns = [_start(corpus, out, bpe_dir, rank, 3, "job-2") for rank in (0, 1, 2)]
    results = [_finish(r) for r in reruns]
    assert results[0]["reused"] == len(finished)
    assert sum(r["here"] for r in results) == total - len(finished)
    _one_process(corpus, bpe_dir, corpus / "one")
    assert _comparable(out) == _comparable(corpus / "one")


def test_task_0_waits_for_a_task_that_starts_after_every_unit_is_done(corpus, bpe_dir):
    """Task 1 starts only once task 0 has done every unit itself: task 0 must not assemble and
    remove the work directory before task 1 has reported (else task 1 would wait for a plan
    that no longer exists, or write into a removed work directory)."""
    out = corpus / "late"
    leader = _start(corpus, out, bpe_dir, 0, 2, "job-1")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        plans = list(out.glob(".work/*/plan.json"))
        if plans:
            total = len(json.loads(plans[0].read_text())["units"])
            if len(list(out.glob(".work/*/units/*.done.json"))) == total:
                break
        assert leader.poll() is None, "task 0 finished without task 1"
        time.sleep(0.05)
    time.sleep(1.0)  # several of task 0's polls
    assert leader.poll() is None and not (out / "metadata.json").exists()
    follower = _start(corpus, out, bpe_dir, 1, 2, "job-1")
    results = [_finish(leader), _finish(follower)]
    assert results[0]["here"] == total and results[1]["here"] == 0
    assert not (out / ".work").exists()
    _one_process(corpus, bpe_dir, corpus / "one")
    assert _comparable(out) == _comparable(corpus / "one")


def test_a_failing_leader_stops_the_other_tasks(corpus, bpe_dir):
    (corpus / "small.jsonl").write_text("")  # the plan succeeds; the source check fails
    out = corpus / "failing"
    tasks = [_start(corpus, out, bpe_dir, rank, 2, "job-1") for rank in (0, 1)]
    for process in tasks:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode != 0
        assert "dataset 'small'" in stderr and "yielded no records" in stderr


def test_slurm_task_from_the_environment():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"}
    task = PrepTask.from_slurm(env)
    assert (task.rank, task.world, task.attempt, task.leader) == (3, 4, "slurm-77.0", False)
    assert PrepTask.from_slurm({**env, "SLURM_STEP_NUM_TASKS": "8"}).world == 8
    with pytest.raises(DataPrepError, match="SLURM_PROCID"):
        PrepTask.from_slurm({"SLURM_NTASKS": "2", "SLURM_JOB_ID": "1"})
    with pytest.raises(DataPrepError, match="outside the 4 tasks"):
        PrepTask.from_slurm({**env, "SLURM_PROCID": "4"})
