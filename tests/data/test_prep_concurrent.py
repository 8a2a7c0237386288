"""Two data preps into one output_dir, through `nemotron nano3 data prep pretrain`.

A prep running in another process (held mid-way by the work-unit gate, tests/prep_gate) is
never disturbed by a second one: of another config or of the same, the second ends at once with
one error naming the output_dir and the running prep, and writes or deletes nothing; the first
then finishes with its own output. A prep killed mid-way holds nothing: the next prep, of
another config, deletes its work directory and builds. A file system without locks: the prep
goes on, with a warning saying that it is unguarded.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from prep_gate import gated_env, wait_for_holds
from typer.testing import CliRunner

from nemotron.cli.main import app
from nemotron.data.config import DataPrepConfig, TokenizerConfig
from nemotron.data.prep import run_data_prep
from nemotron.utils import fs

from .conftest import make_docs, write_jsonl

PREP = ["nano3", "data", "prep", "pretrain"]
CLI = "import sys; from nemotron.cli.main import app; sys.argv[0] = 'nemotron'; app()"


@pytest.fixture
def project(tmp_path, bpe_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEMOTRON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NEMOTRON_JOB_DIR", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    write_jsonl(tmp_path / "web.jsonl", make_docs(300, seed=90, prefix="W "))
    (tmp_path / "blend.json").write_text(
        json.dumps({"datasets": [{"name": "web", "path": "web.jsonl", "weight": 1}]})
    )
    (tmp_path / "prep.yaml").write_text(
        textwrap.dedent(f"""
        blend_path: blend.json
        output_dir: {tmp_path / "out"}
        tokenizer:
          model: {bpe_dir}
        num_shards: 3
        num_workers: 1
        work_unit_mb: 0.004
    """)
    )
    return tmp_path


def _start(project: Path, env: dict[str, str]) -> subprocess.Popen:
    """`nemotron nano3 data prep pretrain -c prep.yaml` (3 shards) in a process of its own."""
    return subprocess.Popen(
        [sys.executable, "-c", CLI, *PREP, "-c", "prep.yaml"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _prep(*overrides: str):
    return CliRunner().invoke(app, [*PREP, "-c", "prep.yaml", *overrides])


def _error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    return line


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _metadata(out: Path) -> dict:
    return json.loads((out / "metadata.json").read_text())


def test_a_live_prep_is_never_disturbed_by_another(project):
    out, gate = project / "out", project / "gate"
    # The first prep finishes one unit, then waits at the next until the test writes
    # gate/done-release.txt: it is mid-way (holding the lock, its work directory half done)
    # for as long as the test needs, whatever the timing.
    first = _start(project, gated_env(gate, 0, await_="0:1:release"))
    try:
        deadline = time.monotonic() + 60
        while not (gate / "done-0.txt").is_file():
            assert first.poll() is None, first.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the first prep finished no unit in 60 s"
            time.sleep(0.05)
        work = _tree(out / ".work")
        assert any(name.endswith("plan.json") for name in work), sorted(work)

        # Another config (4 shards): its start deleted the first prep's work directory, and
        # its end the whole .work/.
        other = _error_line(_prep("num_shards=4"))
        for needle in (f"output_dir {out} is in use", "another build", f"pid {first.pid} ", "blend.json"):
            assert needle in other, other
        # The same config: it tokenized every unit again and swapped the same build in twice.
        same = _error_line(_prep())
        assert "the same build" in same and f"pid {first.pid} " in same, same
        assert _tree(out / ".work") == work
        assert not (out / "metadata.json").exists()

        (gate / "done-release.txt").write_text("go\n")
        output, _ = first.communicate(timeout=120)
        assert first.returncode == 0, output[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert _metadata(out)["config"]["num_shards"] == 3
    assert not (out / ".work").exists()

    # The lock went with it: the other config now builds.
    assert _prep("num_shards=4").exit_code == 0
    assert _metadata(out)["config"]["num_shards"] == 4 and not (out / ".work").exists()


def test_a_killed_preps_work_is_cleaned_by_the_next(project):
    out, gate = project / "out", project / "gate"
    first = _start(project, gated_env(gate, 0, allow="0:1"))

    def running() -> None:
        if first.poll() is not None:
            pytest.fail(f"the first prep ended before the gate: {first.communicate()[0][-3000:]}")

    try:
        wait_for_holds(gate, {0: 1}, running, timeout_s=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)  # mid-way, with the lock held
        first.wait()
    (dead,) = [p for p in (out / ".work").iterdir() if (p / "plan.json").is_file()]

    result = _prep("num_shards=4")
    assert result.exit_code == 0, result.output
    assert not dead.exists() and not (out / ".work").exists()
    assert _metadata(out)["config"]["num_shards"] == 4


def test_a_file_system_without_locks_is_a_warning(tmp_path, bpe_dir, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fs.fcntl, "flock", no_locks)
    write_jsonl(tmp_path / "web.jsonl", make_docs(40, seed=91))
    (tmp_path / "blend.json").write_text(
        json.dumps({"datasets": [{"name": "web", "path": "web.jsonl", "weight": 1}]})
    )
    cfg = DataPrepConfig(
        blend_path=str(tmp_path / "blend.json"),
        output_dir=str(tmp_path / "out"),
        tokenizer=TokenizerConfig(model=str(bpe_dir)),
        num_shards=1,
        num_workers=1,
    )
    seen: list[str] = []
    result = run_data_prep(cfg, progress=lambda state: seen.append(state.warning))
    (warning,) = [w for w in result.warnings if "cannot lock" in w]
    assert str(tmp_path / "out") in warning and "would not be noticed" in warning
    assert warning in seen
    assert (tmp_path / "out" / "metadata.json").is_file() and not (tmp_path / "out" / ".work").exists()
