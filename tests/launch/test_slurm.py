"""Submissions to a real Slurm cluster (one node, accounting through slurmdbd).

Started by `.ci/slurm/run_tests.sh` after `.ci/slurm/setup.sh`; skipped otherwise (see
conftest.py). The first tests check the submission path itself with a stand-in interpreter;
the last ones run the real tiny stages through the `nemotron` CLI: data prep and pretrain
attached (`--run`), then a detached (`--batch`) pretrain whose completion is awaited.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from prep_gate import GATE_PATH, finished, wait_for_holds

from nemotron.config.env_toml import load_env_toml
from nemotron.launch import build_launch_plan, render, submit

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

NEMOTRON = [sys.executable, "-m", "nemotron.cli.main"]
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL")


def write_env(path: Path, cluster: dict[str, str], extra: str = "") -> Path:
    path.write_text(
        textwrap.dedent(
            f"""
            [wandb]
            project = "nemotron-ci"
            entity = "ci-team"

            [ci]
            executor = "slurm"
            account = "{cluster["account"]}"
            partition = "{cluster["partition"]}"
            time = "00:15:00"
            cpus_per_task = 2
            # Distributed stages (pretrain) start 2 ranks under torchrun; data prep stays 1.
            nproc_per_node = 2
            """
        )
        + textwrap.dedent(extra)
    )
    return path


def sacct_state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return out.stdout.strip().split("\n")[0].split(" ")[0] if out.stdout.strip() else ""


def wait_for_job(job_id: str, timeout_s: float = 600) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = sacct_state(job_id)
        if state in TERMINAL:
            return state
        time.sleep(2)
    raise AssertionError(f"job {job_id} not finished after {timeout_s}s (state {state!r})")


def fake_plan(tmp_path, cluster, fake_python, name: str, rc: int = 0, sleep: int = 0, release: str = ""):
    """A plan running `fake_python`: it exits `rc` after `sleep` seconds and, with `release` (a
    path), once that file exists."""
    write_env(
        tmp_path / "env.toml",
        cluster,
        f"""
        [fake]
        extends = "ci"
        python = "{fake_python}"
        env_vars = {{ FAKE_RC = "{rc}", FAKE_SLEEP = "{sleep}", FAKE_RELEASE = "{release}" }}
        """,
    )
    env = load_env_toml(tmp_path / "env.toml")
    job_dir = tmp_path / "runs" / name
    job_dir.mkdir(parents=True)
    (job_dir / "config.yaml").write_text(f"name: {name}\n")
    return build_launch_plan("data_prep", job_dir / "config.yaml", env.profile("fake"), job_dir, env.wandb)


def test_attached_job_streams_logs_and_uses_the_whole_node(tmp_path, slurm_cluster, fake_python, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = fake_plan(tmp_path, slurm_cluster, fake_python, "ok")
    rendered = render(plan)
    lines: list[str] = []
    result = submit(plan, attached=True, log_sink=lines.append)
    assert result.state == "SUCCEEDED", lines
    assert sacct_state(result.job_id) == "COMPLETED"
    text = "\n".join(lines)
    config_in_job = f"{plan.task_dir}/code/config.yaml"
    assert f"ARGS -m nemotron.cli.main nano3 data prep pretrain -c {config_in_job}" in text
    assert f"CWD {tmp_path}" in text and f"JOB_DIR {plan.job_dir}" in text
    assert "WANDB nemotron-ci/ci-team" in text and "CONFIG name: ok" in text
    # Data prep gets every CPU of its exclusive node.
    cpus = int(subprocess.run(["nproc", "--all"], capture_output=True, text=True).stdout)
    node_cpus = int(
        subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0]
    )
    assert f"CPUS {min(cpus, node_cpus)}" in text
    # What ran is what --dry-run showed.
    (script,) = plan.task_dir.parent.glob("*_sbatch.sh")
    assert script.read_text() == rendered


def test_failed_job_reports_failed(tmp_path, slurm_cluster, fake_python, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = fake_plan(tmp_path, slurm_cluster, fake_python, "bad", rc=3)
    result = submit(plan, attached=True)
    assert result.state == "FAILED"
    assert sacct_state(result.job_id) == "FAILED"


def test_interrupt_cancels_the_attached_job(tmp_path, slurm_cluster, fake_python, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = fake_plan(tmp_path, slurm_cluster, fake_python, "interrupted", sleep=300)
    (tmp_path / "plan.pkl").write_bytes(pickle.dumps(plan))
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import pickle, sys\n"
        "from nemotron.launch import submit\n"
        f"plan = pickle.loads(open({str(tmp_path / 'plan.pkl')!r}, 'rb').read())\n"
        "submit(plan, attached=True, log_sink=lambda line: print(line, flush=True))\n"
    )
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # wait until the job runs
            if line.startswith("ARGS"):
                break
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    (log,) = plan.task_dir.glob("log-*.out")
    job_id = re.search(r"_(\d+)_\d+\.out$", log.name).group(1)
    assert wait_for_job(job_id, 120) == "CANCELLED"


def test_detached_job_returns_at_once(tmp_path, slurm_cluster, fake_python, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # The job runs until the test releases it, so it is still pending or running when `submit`
    # returns, however long that takes.
    release = tmp_path / "release"
    plan = fake_plan(tmp_path, slurm_cluster, fake_python, "detached", release=str(release))
    start = time.monotonic()
    try:
        result = submit(plan, attached=False)
        assert time.monotonic() - start < 60
        assert result.state in ("SUBMITTED", "PENDING", "RUNNING")
    finally:
        release.touch()
    assert wait_for_job(result.job_id, 300) == "COMPLETED"
    log = next(Path(result.log_dir).glob(f"log-*_{result.job_id}_*.out")).read_text()
    assert "CONFIG name: detached" in log


def test_ssh_tunnel_ships_the_job_and_follows_it(
    tmp_path, slurm_cluster, fake_python, ci_ssh_key, monkeypatch
):
    """Through the sshd .ci/slurm/setup.sh starts: the job dir is copied to remote_job_dir,
    sbatch/sacct run over SSH and the logs are read back over it."""
    monkeypatch.chdir(tmp_path)
    remote = tmp_path / "cluster-side"
    write_env(
        tmp_path / "env.toml",
        slurm_cluster,
        f"""
        [remote]
        extends = "ci"
        tunnel = "ssh"
        host = "127.0.0.1"
        port = {os.environ.get("SLURM_CI_SSH_PORT", "2222")}
        user = "{os.environ.get("USER", "root")}"
        identity = "{ci_ssh_key}"
        remote_job_dir = "{remote}"
        python = "{fake_python}"
        """,
    )
    env = load_env_toml(tmp_path / "env.toml")
    job_dir = tmp_path / "runs" / "ssh"
    job_dir.mkdir(parents=True)
    (job_dir / "config.yaml").write_text("name: over-ssh\n")
    plan = build_launch_plan("data_prep", job_dir / "config.yaml", env.profile("remote"), job_dir, None)
    lines: list[str] = []
    result = submit(plan, attached=True, log_sink=lines.append)
    text = "\n".join(lines)
    assert result.state == "SUCCEEDED", text
    assert plan.remote_task_dir.startswith(str(remote))
    assert f"-c {plan.remote_task_dir}/code/config.yaml" in text and "CONFIG name: over-ssh" in text
    assert f"JOB_DIR {plan.remote_task_dir}" in text
    assert list(Path(plan.remote_task_dir).glob(f"log-*_{result.job_id}_*.out"))


# --- the real tiny stages, through the CLI -------------------------------------------------

SHORT_PRETRAIN = [
    "train.train_iters=4",
    "checkpoint.save_interval=2",
    "train.eval_interval=2",
    "train.eval_iters=1",
    "train.log_interval=1",
    "scheduler.warmup_tokens=4096",
    "train.micro_batch_size=8",  # global batch 16 = 2 data-parallel ranks x 8
]


def nemotron(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEMOTRON_JOB_DIR")}
    proc = subprocess.run(
        [*NEMOTRON, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def check_pretrain_outputs(job_dir: Path, steps: int = 4) -> None:
    ckpts = sorted(p.name for p in (job_dir / "checkpoints").glob("iter_*"))
    assert ckpts == ["iter_0000002", "iter_0000004"]
    metrics = [json.loads(ln) for ln in (job_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m.get("kind") == "train"]
    assert [m["step"] for m in train] == list(range(1, steps + 1))
    assert all(m["loss"] == m["loss"] and m["loss"] > 0 for m in train)  # finite, positive
    assert json.loads((job_dir / "result.json").read_text())["status"] == "completed"
    # Both torchrun ranks took part in one run (each saved its RNG state into the checkpoint).
    rng = sorted(p.name for p in (job_dir / "checkpoints" / "iter_0000004" / "rng").iterdir())
    assert rng == ["rank_00000.pt", "rank_00001.pt"]


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory, slurm_cluster):
    """A working directory with env.toml where the tiny data prep ran through Slurm (--run)."""
    work = tmp_path_factory.mktemp("slurm-stages")
    write_env(work / "env.toml", slurm_cluster)
    proc = nemotron(["nano3", "data", "prep", "pretrain", "-c", "tiny", "--run", "ci"], work)
    assert "SUCCEEDED" in proc.stdout
    return work


def test_tiny_data_prep_attached(tiny_workdir):
    out = tiny_workdir / "output" / "nano3" / "stage0_pretrain_tiny"
    for split in ("train", "valid", "test"):
        bins = sorted((out / split).glob("*.bin"))
        assert bins and all(b.with_suffix(".idx").is_file() for b in bins), split
        assert all(b.stat().st_size > 0 for b in bins)
    blend = json.loads((out / "blend.json").read_text())
    assert set(blend) >= {"train", "valid", "test"}


def test_tiny_pretrain_attached(tiny_workdir):
    job_dir = tiny_workdir / "runs" / "pretrain-attached"
    args = ["nano3", "pretrain", "-c", "tiny", "--run", "ci", "--job-dir", str(job_dir)]
    proc = nemotron([*args, *SHORT_PRETRAIN], tiny_workdir)
    assert "pretrain completed" in proc.stdout and "SUCCEEDED" in proc.stdout
    check_pretrain_outputs(job_dir)


def test_tiny_pretrain_detached(tiny_workdir):
    job_dir = tiny_workdir / "runs" / "pretrain-batch"
    start = time.monotonic()
    args = ["nano3", "pretrain", "-c", "tiny", "--batch", "ci", "--job-dir", str(job_dir)]
    proc = nemotron([*args, *SHORT_PRETRAIN], tiny_workdir, timeout=120)
    assert time.monotonic() - start < 120
    job_id = re.search(r"job id\s+(\d+)", proc.stdout).group(1)
    assert wait_for_job(job_id, 600) == "COMPLETED"
    check_pretrain_outputs(job_dir)


# --- data prep spread over several Slurm tasks ---------------------------------------------

PREP_TASKS_PROFILE = """
[ci-tasks]
extends = "ci"
ntasks_per_node = 2   # data prep: 2 tasks share the node (and its work units)
cpus_per_task = 1
"""
# The same with the work-unit gate of tests/prep_gate: in `ci-tasks-shared`, task 0 starts no
# unit after its first before task 1 has finished one (so both take units); in `ci-tasks-gated`,
# task 0 stops before its third unit, task 1 before its first (each holding the claim of the
# unit it stopped at).
GATED_PROFILES = """
[ci-tasks-shared]
extends = "ci-tasks"
python = "{python}"
env_vars = {{ PREP_GATE_DIR = "{gate}/shared", PREP_GATE_AWAIT = "0:1:1" }}

[ci-tasks-gated]
extends = "ci-tasks"
python = "{python}"
env_vars = {{ PREP_GATE_DIR = "{gate}/killed", PREP_GATE_ALLOW = "0:2,1:0" }}
"""
# Small work units, so that both tasks get several.
PREP_ARGS = ["nano3", "data", "prep", "pretrain", "-c", "tiny", "work_unit_mb=0.1"]


def comparable(root: Path) -> dict[str, bytes]:
    """Output bytes, with the output path itself (in blend.json) and metadata.json left out."""
    return {
        str(path.relative_to(root)): path.read_bytes().replace(str(root).encode(), b"OUT")
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "metadata.json"
    }


@pytest.fixture(scope="module")
def prep_workdir(tmp_path_factory, slurm_cluster):
    """A working directory with the 2-task profile and a local (one-process) tiny data prep."""
    work = tmp_path_factory.mktemp("slurm-prep-tasks")
    # the gated profile's interpreter: this one, with the gate importable (NeMo-Run runs a
    # module only through an interpreter named `python`)
    python = work / "gated-bin" / "python"
    python.parent.mkdir()
    python.write_text(
        f'#!/bin/bash\nexport PYTHONPATH="{GATE_PATH}${{PYTHONPATH:+:$PYTHONPATH}}"\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    python.chmod(0o755)
    for name in ("shared", "killed"):
        (work / "gate" / name).mkdir(parents=True)
    gated = GATED_PROFILES.format(python=python, gate=work / "gate")
    write_env(work / "env.toml", slurm_cluster, PREP_TASKS_PROFILE + gated)
    nemotron([*PREP_ARGS, f"output_dir={work / 'local'}", "num_workers=1"], work)
    return work


def test_data_prep_on_two_tasks_matches_a_local_run(prep_workdir):
    out = prep_workdir / "two-tasks"
    proc = nemotron(
        [
            *PREP_ARGS,
            "--run",
            "ci-tasks-shared",
            f"output_dir={out}",
            "--job-dir",
            str(prep_workdir / "runs" / "two-tasks"),
            "num_workers=1",  # one process per task: the gated process is the task itself
        ],
        prep_workdir,
    )
    assert "SUCCEEDED" in proc.stdout
    metadata = json.loads((out / "metadata.json").read_text())
    tasks = metadata["producer"]["tasks"]
    assert sorted(t["rank"] for t in tasks) == [0, 1] and all(t["units"] > 0 for t in tasks), tasks
    done = finished(prep_workdir / "gate" / "shared")
    assert {t["rank"]: t["units"] for t in tasks} == {rank: len(ids) for rank, ids in done.items()}
    assert sum(t["units"] for t in tasks) == sum(s["work_units"] for s in metadata["sources"])
    assert "units done per task" in proc.stdout  # progress per task in the job's log
    assert comparable(out) == comparable(prep_workdir / "local")


def test_data_prep_task_killed_then_rerun_redoes_only_its_units(prep_workdir):
    out = prep_workdir / "killed"
    # one process per task (no worker pool): the gated process is the task itself
    args = [*PREP_ARGS, f"output_dir={out}", "num_workers=1"]
    local = json.loads((prep_workdir / "local" / "metadata.json").read_text())
    total = sum(s["work_units"] for s in local["sources"])
    assert total >= 4, "the gate needs 4 units: 2 done and 1 held by task 0, 1 held by task 1"
    proc = nemotron(
        [*args, "--batch", "ci-tasks-gated", "--job-dir", str(prep_workdir / "runs" / "kill-1")],
        prep_workdir,
        timeout=120,
    )
    job_id = re.search(r"job id\s+(\d+)", proc.stdout).group(1)
    gate = prep_workdir / "gate" / "killed"

    def job_runs() -> None:
        state = sacct_state(job_id)
        assert state not in TERMINAL, f"job {job_id} ended ({state}) before its tasks reached the gate"

    try:
        holds = wait_for_holds(gate, {0: 1, 1: 1}, job_runs, poll_s=0.2)
        (work,) = [p for p in out.glob(".work/*") if (p / "plan.json").is_file()]
        markers = {p.name.removesuffix(".done.json") for p in (work / "units").glob("*.done.json")}
        # exactly task 0's first two units; the held ones are not done
        assert {rank: set(ids) for rank, ids in finished(gate).items()} == {0: markers}
        assert len(markers) == 2
        held = holds[1][0]["unit"]
        assert held not in markers and holds[0][0]["unit"] not in markers
        assert list(work.glob(f"claims/slurm-{job_id}.*/{held}"))  # claimed by task 1
        os.kill(holds[1][0]["pid"], signal.SIGKILL)  # task 1 dies; srun ends the step (--kill-on-bad-exit)
        assert wait_for_job(job_id, 300) in ("FAILED", "CANCELLED")
    finally:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=60)  # never leave it held
    assert not (out / "metadata.json").exists()
    assert {p.name.removesuffix(".done.json") for p in (work / "units").glob("*.done.json")} == markers

    rerun = nemotron(
        [*args, "--run", "ci-tasks", "--job-dir", str(prep_workdir / "runs" / "kill-2")], prep_workdir
    )
    assert "SUCCEEDED" in rerun.stdout
    assert re.search(r"units reused\s+2\b", rerun.stdout), rerun.stdout[-3000:]
    metadata = json.loads((out / "metadata.json").read_text())
    redone = sum(t["units"] for t in metadata["producer"]["tasks"])
    assert redone == total - 2  # every unit but the two finished, the held ones included
    assert comparable(out) == comparable(prep_workdir / "local")
