"""`nemotron nano3 pretrain` on a corrupt indexed dataset: one error line naming the file.

Before, a negative sequence length trained without complaint, and a length past the end of
the `.bin` or a token id beyond the model's vocabulary ended in a bare IndexError."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from nemotron.data.indexed import IndexedDatasetWriter

from .test_cli import assert_one_line_error

VOCAB = 4096  # the tiny recipe's model.vocab_size


def _write(prefix: Path, seed: int, count: int = 40) -> str:
    rng = np.random.default_rng(seed)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for _ in range(count):
            writer.add_document(rng.integers(3, 200, size=int(rng.integers(20, 80))))
    return str(prefix)


def _patch_length(prefix: Path, position: int, value: int) -> None:
    idx = Path(f"{prefix}.idx")
    raw = bytearray(idx.read_bytes())
    struct.pack_into("<i", raw, 34 + 4 * position, value)
    idx.write_bytes(bytes(raw))


def _negative_length(prefix: Path) -> str:
    _patch_length(prefix, 3, -5)
    return f"{prefix}.idx: sequence 3 has negative length -5"


def _length_past_the_end(prefix: Path) -> str:
    _patch_length(prefix, 39, 10_000)
    return f"{prefix}.idx: sequence 39"


def _token_beyond_the_vocabulary(prefix: Path) -> str:
    data = np.fromfile(f"{prefix}.bin", dtype=np.uint16)
    data[:] = VOCAB + 7  # every token, so that the first sample read holds one
    data.tofile(f"{prefix}.bin")
    return f"{prefix}.bin: sequence"


def _pretrain(cli, tmp_path: Path, blend: Path, *overrides: str):
    """Two steps of the tiny recipe on `blend`, short samples."""
    return cli(
        "nano3",
        "pretrain",
        "-c",
        "tiny",
        "--job-dir",
        str(tmp_path / "job"),
        f"data.blend={blend}",
        "train.train_iters=2",
        "train.global_batch_size=2",
        "train.micro_batch_size=2",
        "train.seq_length=32",
        f"data.cache_dir={tmp_path / 'cache'}",
        *overrides,
    )


@pytest.mark.parametrize("corrupt", [_negative_length, _length_past_the_end, _token_beyond_the_vocabulary])
def test_pretrain_on_a_corrupt_shard_fails_with_one_line_naming_it(cli, tmp_path, corrupt):
    data = tmp_path / "data"
    data.mkdir()
    blend = {
        "train": ["1.0", _write(data / "train_00000", 1)],
        "valid": ["1.0", _write(data / "valid_00000", 2)],
        "test": ["1.0", _write(data / "test_00000", 3)],
    }
    (data / "blend.json").write_text(json.dumps(blend))
    expected = corrupt(data / "train_00000")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in data.iterdir()}
    result = _pretrain(cli, tmp_path, data / "blend.json", "train.eval_iters=1", "train.eval_interval=1")
    assert result.exit_code == 1
    assert_one_line_error(result, expected)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in data.iterdir()} == before


def test_pretrain_on_prepared_shards_exchanged_after_prep_fails_naming_the_shard(cli, tmp_path):
    """Two shards of a prepared build exchanged (both files renamed): each `.idx` is a valid
    index of its `.bin`, so only data prep's record (metadata.json: each shard's seal) shows
    that they are not what the blend's weights and the run's data order were made for."""
    prep = cli("nano3", "data", "prep", "pretrain", "-c", "tiny", "--sample", "120", "num_shards=2")
    assert prep.exit_code == 0, prep.output
    out = cli.work / "output/nano3/stage0_pretrain_tiny-sample120"
    first, second = (out / "train" / f"stdlib-code_0000{i}" for i in (0, 1))
    for suffix in (".bin", ".idx"):
        Path(f"{first}{suffix}").rename(tmp_path / "x")
        Path(f"{second}{suffix}").rename(f"{first}{suffix}")
        (tmp_path / "x").rename(f"{second}{suffix}")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
    result = _pretrain(cli, tmp_path, out / "blend.json")
    assert_one_line_error(
        result, f"{first} (train split of {out / 'blend.json'}) is not the shard data prep wrote"
    )
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()} == before
