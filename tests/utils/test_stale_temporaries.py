"""Temporaries left by killed writers: removed by the next writer when, and only when, their
writer is provably gone (`fs.remove_stale_temporaries`); a live writer's, another host's, or a
foreign file with a similar name stays. Liveness is checked here against real processes (a
child that exited, one still running, a zombie), not against a copy of the rule."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nemotron.utils import fs

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")

SRC = str(Path(fs.__file__).resolve().parents[2])
# A child that makes a temporary directory and a temporary file of OUT, prints their paths,
# then sleeps (argv[2] seconds) or exits at once: a writer killed part-way, or a live one.
CHILD = """
import sys, time
from pathlib import Path
from nemotron.utils import fs
out = Path(sys.argv[1])
d = fs.temporary_dir(out)
(d / "weights.safetensors").write_bytes(b"x" * 100)
f = fs.temporary_name(out.with_name("index.npy"))
f.write_bytes(b"partial")
print(d, f, flush=True)
time.sleep(float(sys.argv[2]))
"""


def _child(out: Path, sleep: float) -> tuple[subprocess.Popen, Path, Path]:
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out), str(sleep)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    return proc, Path(line[0]), Path(line[1])


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _start(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def test_a_dead_writers_temporaries_go_and_a_live_writers_stay(tmp_path: Path):
    out = tmp_path / "export"
    live, live_dir, live_file = _child(out, 60)
    try:
        dead, dead_dir, dead_file = _child(out, 0)
        dead.wait()
        assert live_dir.is_dir()  # the killed writer's start left the live one's alone
        assert dead_dir.name.startswith(".export.") and dead_dir.name.endswith(".tmp")
        assert dead_dir.stat().st_mode & 0o777 == 0o700  # private until published, as mkdtemp's
        mine = fs.temporary_dir(out)  # the next writer of OUT: removes the dead one's directory
        assert not dead_dir.exists()
        assert live_dir.is_dir() and (live_dir / "weights.safetensors").is_file()
        assert mine.is_dir() and mine != live_dir
        assert dead_file.exists()  # the directory writer cleans temporaries of OUT only
        removed = fs.remove_stale_temporaries(tmp_path)  # a sweep: any name
        assert removed == [dead_file]
        assert sorted(tmp_path.iterdir()) == sorted([mine, live_dir, live_file])
    finally:
        live.kill()
        live.wait()
    # The live writer killed: its temporaries are stale now; this process's own never are.
    assert sorted(fs.remove_stale_temporaries(tmp_path)) == sorted([live_dir, live_file])
    assert list(tmp_path.iterdir()) == [mine]


def test_a_zombie_writer_is_gone(tmp_path: Path):
    """Killed but not yet reaped by its parent: it writes nothing any more."""
    proc, directory, file = _child(tmp_path / "out", 60)
    proc.kill()
    deadline = time.monotonic() + 10
    while _state(proc.pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _state(proc.pid) == "Z"
    try:
        assert sorted(fs.remove_stale_temporaries(tmp_path)) == sorted([directory, file])
    finally:
        proc.wait()


def _named(parent: Path, name: str, host: str, start: int, pid: int, directory: bool = False) -> Path:
    path = parent / f".{name}.{host}.{start}.{pid}-0123abcd.tmp"
    if directory:
        path.mkdir()
        (path / "shard").write_bytes(b"x")
    else:
        path.write_bytes(b"x")
    return path


def test_only_what_is_provably_a_dead_writers_goes(tmp_path: Path):
    host = fs._host_token()
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    parent = os.getppid()  # a live process that is not this one
    gone = [
        _named(tmp_path, "out", host, 5, pid_max + 1, directory=True),  # no such process
        _named(tmp_path, "out", host, _start(parent) + 1, parent),  # the pid is another process's now
    ]
    kept = [
        _named(tmp_path, "out", host, _start(parent), parent, directory=True),  # its writer runs
        _named(tmp_path, "out", "abcdef012345", 5, pid_max + 1, directory=True),  # another host
        _named(tmp_path, "out", "0" * 12, 5, pid_max + 1),  # a system where pids cannot be checked
        _named(tmp_path, "other", host, 5, pid_max + 1),  # another output's (when asked for "out")
    ]
    foreign = [tmp_path / n for n in (".out.tmp-x1y2z3", f".out.{pid_max + 1}-0123abcd.tmp", "out.tmp")]
    foreign.append(tmp_path / f"out.{host}.5.{pid_max + 1}-0123abcd.tmp")  # not hidden
    foreign.append(tmp_path / f".out.{host}.5.{pid_max + 1}-0123abcd.tmp.bak")
    # this host's token in capitals (a token of digits only has none: one letter made capital)
    shouted = host.upper() if host.upper() != host else "A" + host[1:]
    foreign.append(tmp_path / f".out.{shouted}.5.{pid_max + 1}-0123abcd.tmp")
    for path in foreign:
        path.write_bytes(b"not ours")
    # A link named as ours: the link goes, never what it points to.
    target = tmp_path / "precious"
    target.mkdir()
    (target / "f").write_bytes(b"keep")
    link = tmp_path / f".out.{host}.5.{pid_max + 2}-0123abcd.tmp"
    link.symlink_to(target)
    gone.append(link)

    assert sorted(fs.remove_stale_temporaries(tmp_path, "out")) == sorted(gone)
    for path in kept + foreign:
        assert path.exists(), path
    assert (target / "f").read_bytes() == b"keep"
    assert fs.remove_stale_temporaries(tmp_path / "missing") == []


def test_a_name_holding_dots_is_matched_whole(tmp_path: Path):
    """`.a.b.<token>.tmp` is a temporary of "a.b", never of "b" or "a"."""
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    path = _named(tmp_path, "model.v2", fs._host_token(), 5, pid_max + 1)
    assert fs.remove_stale_temporaries(tmp_path, "v2") == []
    assert fs.remove_stale_temporaries(tmp_path, "model") == []
    assert fs.remove_stale_temporaries(tmp_path, "model.v2") == [path]


def test_the_writers_clean_up_after_killed_runs_of_themselves(tmp_path: Path):
    """Each writer removes what a killed run of it left: a job directory, an index cache entry
    (its .npy arrays), an indexed dataset's partial shard; a data prep unit's is the prep's
    own sweep (tests/data/test_prep_guarantees.py)."""
    from nemotron.artifacts.jobdir import create_job_dir
    from nemotron.data.gpt_dataset import cached_arrays
    from nemotron.data.indexed import IndexedDatasetWriter

    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    host = fs._host_token()
    runs = tmp_path / "runs"
    runs.mkdir()
    stale_job = _named(runs, "job-0001", host, 5, pid_max + 1, directory=True)
    create_job_dir(runs / "job-0002", config_yaml="a: 1\n", info={})
    assert not stale_job.exists() and sorted(p.name for p in runs.iterdir()) == ["job-0002"]

    cache = tmp_path / "cache"
    cache.mkdir()
    stale_array = _named(cache, "0123-sample_index.npy", host, 5, pid_max + 1)
    arrays = cached_arrays(cache, {"k": 1}, ("a",), lambda: {"a": np.arange(3)})
    assert arrays["a"].tolist() == [0, 1, 2] and not stale_array.exists()

    shards = tmp_path / "shards"
    shards.mkdir()
    with IndexedDatasetWriter(shards / "web_00000") as writer:
        writer.add_document([1, 2, 3])
        live = sorted(p.name for p in shards.iterdir())
        # its own temporaries are named as a live writer's: a sweep now leaves them
        assert fs.remove_stale_temporaries(shards) == [] and len(live) == 2
        assert all(name.startswith(".web_00000.") and name.endswith(".tmp") for name in live)
    assert sorted(p.name for p in shards.iterdir()) == ["web_00000.bin", "web_00000.idx"]
    assert json.loads((runs / "job-0002" / "job.json").read_text()) == {}
