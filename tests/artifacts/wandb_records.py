"""Read the records an offline W&B run wrote (`run-<id>.wandb`): what `wandb sync` would send.

The file is W&B's append-only log: a 7-byte header (`:W&B`, magic, version), then 32 KiB blocks
of chunks, each with a 7-byte header (CRC32, length, type: full, first, middle, last), every
record one protobuf `Record` of `wandb.proto.wandb_internal_pb2`. Written here from that
description so the tests read what W&B stored, not what the project meant to store."""

from __future__ import annotations

import struct
import time
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: str | Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer too short for a chunk header: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and length == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):  # a chunk still being written
            return
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def artifact_records(run_dir: str | Path, timeout: float = 60.0) -> list:
    """The ArtifactRecord messages of one offline run directory, in order.

    W&B's service process writes the file; `run.finish()` can return before the last records
    are on disk, so this waits (up to `timeout` seconds) for the run's exit record."""
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout
    while True:
        paths = list(Path(run_dir).glob("*.wandb"))
        records = []
        if len(paths) == 1:
            for raw in raw_records(paths[0]):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(raw)
                records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
        if time.monotonic() > deadline:
            raise AssertionError(f"no complete W&B run file in {run_dir} after {timeout} s")
        time.sleep(0.2)
