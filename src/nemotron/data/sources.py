"""Where documents come from: the Hugging Face hub and local files.

A blend entry's ``path`` is one of

- ``hf://org/name`` (with the entry's ``subset``, ``revision`` and ``hf_split``): read through
  ``datasets.load_dataset(..., streaming=True)`` at a revision resolved to a commit with
  ``huggingface_hub``; ``hf:///abs/dir`` reads a local directory laid out as a hub dataset
  repository through the same code path (its revision is a hash of the files' names, sizes and
  mtimes);
- a local file, directory or glob of ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst`` (also ``.json``
  lines), ``.parquet`` or ``.txt`` (one document per ``.txt`` file).

``plan_source`` lists a dataset's *pieces*, the units of parallel work: byte ranges of plain
jsonl files (cut at line starts), whole compressed files, groups of parquet row groups, groups
of ``.txt`` files, and the file shards of a hub dataset. Reading the pieces in order yields the
dataset's documents in one fixed order, however the pieces are cut, which is what makes the
output deterministic. ``iter_records`` reads one piece and yields texts and bad records.

The readers of optional formats import their libraries where used (measured import times on
the 2-core CI machine, 2026-12-03: ``datasets`` ~12 s, ``pyarrow.parquet`` ~1 s): a data prep
of local jsonl files never pays for them.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import gzip
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

HUB_SCHEME = "hf://"
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSIONS = {".gz": "gz", ".zst": "zst", ".zstd": "zst"}
PARQUET_ROWS_PER_PIECE = 200_000
TXT_FILES_PER_PIECE = 256
# Compressed jsonl holds about this many times its size in text (sizing estimate only).
COMPRESSED_TEXT_RATIO = 4

# Kinds of bad records (counted per source, first few locations reported).
MALFORMED_JSON = "malformed_json"
MISSING_TEXT = "missing_text_field"
NON_UTF8 = "non_utf8"
EMPTY = "empty_document"
BAD_KINDS = (MALFORMED_JSON, MISSING_TEXT, NON_UTF8, EMPTY)


class SourceError(ValueError):
    """A source that cannot be found, listed or read; the message names it."""


@dataclass(frozen=True)
class Piece:
    """One unit of reading work. ``kind``: jsonl | parquet | txt | hub."""

    kind: str
    files: tuple[str, ...] = ()
    compression: str | None = None
    start: int = 0  # jsonl: byte range [start, end); parquet: row groups [start, end)
    end: int | None = None
    # hub
    repo: str | None = None
    subset: str | None = None
    revision: str | None = None
    hf_split: str = "train"
    shard_index: int = 0
    num_shards: int = 1
    # Estimated bytes of text to read (compressed files and parquet: uncompressed size); -1
    # when unknown (hub shards). Sizes the work units; never affects the output.
    size: int = -1

    def key(self) -> str:
        """Stable short id of this piece (used in completion-marker names)."""
        return hashlib.sha1(repr(self).encode()).hexdigest()[:12]


@dataclass
class SourcePlan:
    """A dataset's pieces, plus what the fingerprint and metadata record about the source."""

    pieces: list[Piece]
    description: dict = field(default_factory=dict)  # path, kind, revision, files (size, mtime)


@dataclass
class Record:
    text: str | None  # None for a bad record
    location: tuple  # (file, line) | (file, "@", byte offset) | (file, "row", n)
    bad_kind: str | None = None


def _compression(path: Path) -> str | None:
    return COMPRESSIONS.get(path.suffix)


def _data_kind(path: Path) -> str | None:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last in JSONL_SUFFIXES:
        return "jsonl"
    if last == ".parquet" and not _compression(path):
        return "parquet"
    if last == ".txt" and not _compression(path):
        return "txt"
    return None


def _local_files(path_spec: str, base_dir: Path | None) -> list[Path]:
    path = Path(path_spec).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if any(char in path_spec for char in "*?["):
        matches = sorted(Path(p) for p in globlib.glob(str(path), recursive=True))
        files = [p for p in matches if p.is_file() and _data_kind(p)]
        if not files:
            raise SourceError(f"glob {path_spec!r} matches no .jsonl/.parquet/.txt files")
        return files
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and _data_kind(p) and not p.name.startswith(".")
        )
        if not files:
            raise SourceError(f"directory {path} holds no .jsonl/.parquet/.txt files")
        return files
    if path.is_file():
        if not _data_kind(path):
            raise SourceError(f"{path}: unsupported file type (expected .jsonl[.gz|.zst], .parquet or .txt)")
        return [path]
    raise SourceError(f"source path not found: {path}")


def _file_info(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _jsonl_pieces(path: Path, piece_bytes: int) -> list[Piece]:
    compression = _compression(path)
    size = path.stat().st_size
    if compression:
        return [Piece("jsonl", (str(path),), compression, size=size * COMPRESSED_TEXT_RATIO)]
    if size <= piece_bytes:
        return [Piece("jsonl", (str(path),), None, size=size)]
    return [
        Piece(
            "jsonl",
            (str(path),),
            None,
            start,
            min(start + piece_bytes, size),
            size=min(start + piece_bytes, size) - start,
        )
        for start in range(0, size, piece_bytes)
    ]


def _parquet_pieces(path: Path) -> list[Piece]:
    import pyarrow.parquet as pq  # ~1 s to import (see the module docstring): parquet only

    try:
        metadata = pq.ParquetFile(path).metadata
    except Exception as error:
        raise SourceError(f"{path}: not a readable parquet file: {error}") from error
    pieces, start, rows, size = [], 0, 0, 0
    for group in range(metadata.num_row_groups):
        rows += metadata.row_group(group).num_rows
        size += metadata.row_group(group).total_byte_size
        if rows >= PARQUET_ROWS_PER_PIECE:
            pieces.append(Piece("parquet", (str(path),), None, start, group + 1, size=size))
            start, rows, size = group + 1, 0, 0
    if start < metadata.num_row_groups or not pieces:
        pieces.append(Piece("parquet", (str(path),), None, start, metadata.num_row_groups, size=size))
    return pieces


def _txt_piece(files: list[str]) -> Piece:
    return Piece("txt", tuple(files), size=sum(Path(f).stat().st_size for f in files))


def plan_local(path_spec: str, base_dir: Path | None, piece_bytes: int) -> SourcePlan:
    files = _local_files(path_spec, base_dir)
    pieces: list[Piece] = []
    txt_batch: list[str] = []
    for file in files:
        kind = _data_kind(file)
        if kind == "txt":
            txt_batch.append(str(file))
            if len(txt_batch) >= TXT_FILES_PER_PIECE:
                pieces.append(_txt_piece(txt_batch))
                txt_batch = []
            continue
        if txt_batch:
            pieces.append(_txt_piece(txt_batch))
            txt_batch = []
        pieces.extend(_jsonl_pieces(file, piece_bytes) if kind == "jsonl" else _parquet_pieces(file))
    if txt_batch:
        pieces.append(_txt_piece(txt_batch))
    description = {
        "path": path_spec,
        "kind": "local",
        "revision": None,
        "files": [_file_info(f) for f in files],
    }
    return SourcePlan(pieces, description)


def split_pieces(pieces: list[Piece], piece_bytes: int) -> list[Piece]:
    """Plain jsonl pieces larger than ``piece_bytes`` cut into byte ranges of at most that
    size (reading the ranges in order yields the same records as the whole piece); other
    pieces unchanged."""
    out: list[Piece] = []
    for piece in pieces:
        if piece.kind != "jsonl" or piece.compression or piece.size <= piece_bytes:
            out.append(piece)
            continue
        end = piece.end if piece.end is not None else piece.start + piece.size
        for start in range(piece.start, end, piece_bytes):
            stop = min(start + piece_bytes, end)
            out.append(dataclasses.replace(piece, start=start, end=stop, size=stop - start))
    return out


def _hub_repo(path_spec: str) -> str:
    repo = path_spec[len(HUB_SCHEME) :]
    if not repo:
        raise SourceError(f"{path_spec!r}: expected hf://org/name")
    return repo


def _local_repo_revision(directory: Path) -> str:
    digest = hashlib.sha1()
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and ".cache" not in p.parts):
        info = path.stat()
        digest.update(f"{path.relative_to(directory)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return "local-" + digest.hexdigest()


def resolve_hub_revision(repo: str, revision: str | None) -> str:
    """The commit a hub dataset revision (branch, tag, commit, or None for main) points at."""
    if repo.startswith("/"):
        return _local_repo_revision(Path(repo))
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision  # already a commit: no hub call needed (works offline from the cache)
    from huggingface_hub import HfApi  # hub sources only

    try:
        sha = HfApi().dataset_info(repo, revision=revision).sha
    except Exception as error:  # offline, private, missing: name the dataset
        raise SourceError(f"cannot resolve hf://{repo} revision {revision or 'main'}: {error}") from error
    if sha is None:
        raise SourceError(f"cannot resolve hf://{repo} revision {revision or 'main'}: the hub gave no commit")
    return sha


def _load_hub(repo: str, subset: str | None, revision: str | None, hf_split: str):
    import datasets  # ~12 s to import on the 2-core CI machine: hub sources only

    kwargs = {} if repo.startswith("/") else {"revision": revision}
    try:
        return datasets.load_dataset(repo, name=subset, split=hf_split, streaming=True, **kwargs)
    except Exception as error:
        where = f"hf://{repo}" + (f" subset {subset!r}" if subset else "")
        raise SourceError(f"cannot open {where} split {hf_split!r}: {error}") from error


def plan_hub(path_spec: str, subset: str | None, revision: str | None, hf_split: str) -> SourcePlan:
    repo = _hub_repo(path_spec)
    if repo.startswith("/") and not Path(repo).is_dir():
        raise SourceError(f"{path_spec}: local hub-layout directory {repo} not found")
    commit = resolve_hub_revision(repo, revision)
    dataset = _load_hub(repo, subset, commit, hf_split)
    shards = max(1, int(dataset.n_shards))
    pieces = [
        Piece(
            "hub",
            repo=repo,
            subset=subset,
            revision=commit,
            hf_split=hf_split,
            shard_index=i,
            num_shards=shards,
        )
        for i in range(shards)
    ]
    description = {
        "path": path_spec,
        "kind": "hub",
        "subset": subset,
        "hf_split": hf_split,
        "requested_revision": revision,
        "revision": commit,
        "num_shards": shards,
    }
    return SourcePlan(pieces, description)


def plan_source(
    path_spec: str,
    *,
    subset: str | None = None,
    revision: str | None = None,
    hf_split: str = "train",
    base_dir: Path | None = None,
    piece_bytes: int = 64 << 20,
) -> SourcePlan:
    if path_spec.startswith(HUB_SCHEME):
        return plan_hub(path_spec, subset, revision, hf_split)
    if "://" in path_spec:
        raise SourceError(f"{path_spec!r}: unsupported scheme (use hf://org/name or a local path)")
    return plan_local(path_spec, base_dir, piece_bytes)


# -------------------------------------------------------------------------------------------
# Reading


class _ZstdFrames(io.RawIOBase):
    """A `.zst` file's decompressed bytes, frame after frame (`cat a.zst b.zst` is one stream).

    zstandard's own `stream_reader` ends quietly where a file is cut inside a frame, so a
    truncated file would read as a shorter one and lose its tail unseen; this reader raises
    EOFError there, as `gzip` does, and ValueError for bytes that are not zstd at all."""

    _READ_BYTES = 1 << 17  # compressed bytes fed at a time: bounds one step's decompressed output

    def __init__(self, path: str):
        import zstandard  # .zst files only

        self._zstd = zstandard
        self._decompressor = zstandard.ZstdDecompressor()
        self._file = open(path, "rb")
        self._frame = self._decompressor.decompressobj()
        self._in_frame = False  # bytes of the current frame were fed, its end not yet reached
        self._pending = memoryview(b"")  # decompressed, not yet read

    def readable(self) -> bool:
        return True

    def _feed(self, data: bytes) -> bytes:
        out = []
        while data:
            try:
                out.append(self._frame.decompress(data))
            except self._zstd.ZstdError as error:
                raise ValueError(f"not a valid zstd stream ({error})") from error
            self._in_frame = not self._frame.eof
            if self._in_frame:
                break
            data = self._frame.unused_data  # the next frame's first bytes, if any
            self._frame = self._decompressor.decompressobj()
        return b"".join(out)

    def readinto(self, buffer) -> int:
        while not self._pending:
            chunk = self._file.read(self._READ_BYTES)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return 0
            self._pending = memoryview(self._feed(chunk))
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


def _open_binary(path: str, compression: str | None):
    if compression == "gz":
        return gzip.open(path, "rb")
    if compression == "zst":
        return io.BufferedReader(_ZstdFrames(path), 1 << 20)
    return open(path, "rb", buffering=1 << 20)


def _check_text(text, location) -> Record:
    if not isinstance(text, str):
        return Record(None, location, MISSING_TEXT)
    if not text.strip():
        return Record(None, location, EMPTY)
    return Record(text, location)


def _iter_jsonl(piece: Piece, text_field: str) -> Iterator[Record]:
    path = piece.files[0]
    try:
        handle = _open_binary(path, piece.compression)
    except OSError as error:
        raise SourceError(f"{path}: cannot open: {error}") from error
    with handle:
        position, line_number = piece.start, 0
        if piece.start > 0:
            # Start at the first line beginning at or after `start` (the previous piece owns
            # the line that straddles the boundary).
            handle.seek(piece.start - 1)
            skipped = handle.readline()
            position = piece.start - 1 + len(skipped)
        try:
            for line in handle:
                if piece.end is not None and position >= piece.end:
                    break
                line_start = position
                position += len(line)
                line_number += 1
                location = (path, line_number) if piece.start == 0 else (path, "@", line_start)
                if not line.strip():
                    continue
                try:
                    decoded = line.decode("utf-8")
                except UnicodeDecodeError:
                    yield Record(None, location, NON_UTF8)
                    continue
                if line_start == 0 and decoded.startswith("\ufeff"):
                    decoded = decoded[1:]  # a byte-order mark opening the file is not the record's
                try:
                    row = json.loads(decoded)
                except (ValueError, RecursionError):  # RecursionError: nested too deeply
                    yield Record(None, location, MALFORMED_JSON)
                    continue
                if not isinstance(row, dict):
                    yield Record(None, location, MALFORMED_JSON)
                    continue
                yield _check_text(row.get(text_field), location)
        except (OSError, EOFError, ValueError) as error:  # truncated gzip/zstd stream
            raise SourceError(f"{path}: unreadable after line {line_number}: {error}") from error


def _iter_parquet(piece: Piece, text_field: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq  # ~1 s to import (see the module docstring): parquet only

    path = piece.files[0]
    # pyarrow's errors (corrupt pages: "OSError: Corrupt snappy compressed data.") name no file.
    unreadable = (OSError, ValueError, pa.ArrowException)
    try:
        parquet = pq.ParquetFile(path)
    except unreadable as error:
        raise SourceError(f"{path}: not a readable parquet file: {error}") from error
    if text_field not in parquet.schema_arrow.names:
        raise SourceError(
            f"{path}: no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)})"
        )
    row = sum(parquet.metadata.row_group(g).num_rows for g in range(piece.start))
    assert piece.end is not None  # parquet pieces always carry their row-group range
    groups = list(range(piece.start, piece.end))
    try:
        for batch in parquet.iter_batches(batch_size=1024, row_groups=groups, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                yield _check_text(text, (path, "row", row))
                row += 1
    except unreadable as error:
        raise SourceError(f"{path}: unreadable at row {row}: {error}") from error


def _iter_txt(piece: Piece) -> Iterator[Record]:
    for path in piece.files:
        try:
            raw = Path(path).read_bytes()
        except OSError as error:
            raise SourceError(f"{path}: cannot read: {error}") from error
        try:
            text = raw.decode("utf-8-sig")  # a leading byte-order mark is not text
        except UnicodeDecodeError:
            yield Record(None, (path, 1), NON_UTF8)
            continue
        yield _check_text(text, (path, 1))


def _iter_hub(piece: Piece, text_field: str) -> Iterator[Record]:
    assert piece.repo is not None  # hub pieces always name their repository
    dataset = _load_hub(piece.repo, piece.subset, piece.revision, piece.hf_split)
    if piece.num_shards > 1:
        dataset = dataset.shard(num_shards=piece.num_shards, index=piece.shard_index)
    where = (
        f"hf://{piece.repo}" + (f"[{piece.subset}]" if piece.subset else "") + f"#shard{piece.shard_index}"
    )
    for row_number, row in enumerate(dataset):
        if text_field not in row and row_number == 0:
            raise SourceError(f"{where}: no field {text_field!r} (fields: {', '.join(row)})")
        yield _check_text(row.get(text_field), (where, "row", row_number))


def iter_records(piece: Piece, text_field: str) -> Iterator[Record]:
    """Documents and bad records of one piece, in file order."""
    if piece.kind == "jsonl":
        return _iter_jsonl(piece, text_field)
    if piece.kind == "parquet":
        return _iter_parquet(piece, text_field)
    if piece.kind == "txt":
        return _iter_txt(piece)
    if piece.kind == "hub":
        return _iter_hub(piece, text_field)
    raise SourceError(f"unknown piece kind {piece.kind!r}")


def line_number_at(path: str, offset: int) -> int:
    """1-based line number of the line starting at byte ``offset`` of a plain file."""
    count, remaining = 0, offset
    with open(path, "rb") as handle:
        while remaining > 0:
            chunk = handle.read(min(remaining, 1 << 22))
            if not chunk:
                break
            count += chunk.count(b"\n")
            remaining -= len(chunk)
    return count + 1


def format_location(location: tuple) -> str:
    if len(location) == 2:
        return f"{location[0]}:{location[1]}"
    path, tag, value = location
    if tag == "@":
        return f"{path}:{line_number_at(path, value)}"
    return f"{path}:row {value}"
