"""The atomic-write helper: complete files only, the old file kept on failure, no debris."""

from pathlib import Path

import numpy as np
import pytest

from nemotron.utils.fs import atomic_path, atomic_write_bytes, atomic_write_text


def test_writes_text_and_bytes_and_creates_parents(tmp_path: Path):
    target = tmp_path / "a" / "b" / "file.json"
    assert atomic_write_text(target, "{}\n") == target
    assert target.read_text() == "{}\n"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.json"]


def test_failure_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "state.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the ne")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.txt"]


def test_any_writer_through_the_temporary_path(tmp_path: Path):
    target = tmp_path / "x.npy"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".x.npy.") and not target.exists()
        with open(tmp, "wb") as f:
            np.save(f, np.arange(3))
    assert np.load(target).tolist() == [0, 1, 2]
