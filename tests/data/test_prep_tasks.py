"""Several processes (Slurm tasks on one or many nodes) sharing one data prep.

The tasks here are local processes given their rank as Slurm would (`PrepTask`); the Slurm
stage (`tests/launch/test_slurm.py`) runs the same through `srun`. Checked: the output is
byte-identical to a one-process run, every task takes units, and after a task is killed
(with the step, as srun does) the rerun redoes only the unfinished units. Where the timing of
the tasks matters, the work-unit gate (tests/prep_gate) fixes it: a task finishes a chosen
number of units, then holds the next one (or waits for another task), so that every run of a
test reaches the same point whatever the load of the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from prep_gate import finished, gated_env, wait_for_holds

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


def _start(
    root: Path, out: Path, bpe_dir: Path, rank: int, world: int, attempt: str, env: dict | None = None
) -> subprocess.Popen:
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
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
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


def _plan_units(out: Path) -> tuple[Path, list[str]]:
    """The work directory of the prep writing `out` and the ids of its units, in plan order."""
    (work,) = [p for p in (out / ".work").iterdir() if (p / "plan.json").is_file()]
    return work, [unit["unit_id"] for unit in json.loads((work / "plan.json").read_text())["units"]]


def _kill(*processes: subprocess.Popen) -> None:
    """kill -9 each task with its processes, in this order (one that already ended is skipped)."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    for process in processes:
        process.communicate()


def test_two_tasks_share_the_units_and_write_the_same_bytes(corpus, bpe_dir):
    out, gate = corpus / "two-tasks", corpus / "gate"
    # Task 0 finishes one unit, then starts no other before task 1 has finished one: both take
    # units however the processes are scheduled (task 1 starts first and waits for the plan).
    tasks = [
        _start(corpus, out, bpe_dir, rank, 2, "job-1", gated_env(gate, rank, await_="0:1:1"))
        for rank in (1, 0)
    ]
    follower, leader = (_finish(t) for t in tasks)
    metadata = json.loads((out / "metadata.json").read_text())
    units = sum(s["work_units"] for s in metadata["sources"])
    by_task = {t["rank"]: t["units"] for t in metadata["producer"]["tasks"]}
    assert by_task == {0: leader["here"], 1: follower["here"]}
    done = finished(gate)
    assert by_task == {rank: len(ids) for rank, ids in done.items()}
    assert by_task[0] > 0 and by_task[1] > 0 and by_task[0] + by_task[1] == units
    assert len(set(done[0]) | set(done[1])) == units  # no unit done twice
    assert {t["host"] for t in metadata["producer"]["tasks"]} == {"node0", "node1"}
    assert not (out / ".work").exists()

    _one_process(corpus, bpe_dir, corpus / "one")
    assert _comparable(out) == _comparable(corpus / "one")


def test_killed_task_then_rerun_redoes_only_unfinished_units(corpus, bpe_dir):
    out, gate = corpus / "killed", corpus / "gate-1"
    # Task 0 finishes 2 units and task 1 one; each then holds the next unit it claimed (the gate
    # stops it there), so the kill comes at a known point with units in flight.
    allow = "0:2,1:1"
    leader = _start(corpus, out, bpe_dir, 0, 2, "job-1", gated_env(gate, 0, allow=allow))
    follower = _start(corpus, out, bpe_dir, 1, 2, "job-1", gated_env(gate, 1, allow=allow))

    def running() -> None:
        for process in (leader, follower):
            if process.poll() is not None:
                _kill(leader, follower)
                pytest.fail(f"a task ended before the gate: {process.communicate()[1][-3000:]}")

    try:
        holds = wait_for_holds(gate, {0: 1, 1: 1}, running, timeout_s=120)
    finally:
        _kill(follower, leader)  # task 1 dies (kill -9); srun then ends the step (--kill-on-bad-exit)
    assert holds[1][0]["pid"] == follower.pid  # the task itself (one worker: no pool)
    held = {holds[0][0]["unit"], holds[1][0]["unit"]}
    done = finished(gate)
    assert len(done[0]) == 2 and len(done[1]) == 1
    assert not (out / "metadata.json").exists()
    work, units = _plan_units(out)
    markers = {p.name.removesuffix(".done.json") for p in (work / "units").glob("*.done.json")}
    assert markers == set(done[0]) | set(done[1])  # exactly the units the tasks finished
    assert not held & markers and held <= set(units)
    assert {p.name for p in (work / "claims" / "job-1").iterdir()} == markers | held
    assert len(units) >= 6, "the gate needs 5 units, and the rerun one more to share"

    # The rerun (a new attempt, here with one task more) reuses exactly the finished units and
    # does the others, the held ones included, each once.
    rerun_gate = corpus / "gate-2"
    reruns = [_start(corpus, out, bpe_dir, r, 3, "job-2", gated_env(rerun_gate, r)) for r in (0, 1, 2)]
    results = [_finish(r) for r in reruns]
    assert results[0]["reused"] == len(markers) == 3
    redone = finished(rerun_gate)
    assert [r["here"] for r in results] == [len(redone.get(rank, [])) for rank in (0, 1, 2)]
    redone_ids = [unit for ids in redone.values() for unit in ids]
    assert sorted(redone_ids) == sorted(set(units) - markers)
    _one_process(corpus, bpe_dir, corpus / "one")
    assert _comparable(out) == _comparable(corpus / "one")


def test_task_0_waits_for_a_task_that_starts_after_every_unit_is_done(corpus, bpe_dir):
    """Task 1 starts only once task 0 has done every unit itself: task 0 must not assemble and
    remove the work directory before task 1 has reported (else task 1 would wait for a plan
    that no longer exists, or write into a removed work directory)."""
    out = corpus / "late"
    leader = _start(corpus, out, bpe_dir, 0, 2, "job-1")
    deadline = time.monotonic() + 120
    while True:
        plans = list(out.glob(".work/*/plan.json"))
        if plans:
            total = len(json.loads(plans[0].read_text())["units"])
            if len(list(out.glob(".work/*/units/*.done.json"))) == total:
                break
        assert leader.poll() is None, "task 0 finished without task 1"
        assert time.monotonic() < deadline, "task 0 did not finish the units in 120 s"
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
