"""Data preparation: raw blend -> tokenized Megatron shards, ``blend.json`` and ``metadata.json``.

Pipeline
1. Plan: validate the blend, list every source's pieces (``sources.plan_source``), resolve the
   tokenizer, and compute the fingerprint of sources (paths, revisions, file sizes and mtimes),
   tokenizer identity and prep config. If ``metadata.json`` in the output directory carries
   the same fingerprint and its shards exist, nothing is done (``DataPrepResult.cached``).
   Otherwise the input is cut into *work units* of about equal text (``UNITS_PER_WORKER``
   units per worker of all tasks; large files split, small ones grouped), recorded in
   ``.work/<fingerprint>/plan.json`` so that a rerun reuses the same units.
2. Tokenize: each work unit is processed by a pool of single-core worker processes (every
   CPU of the process by default). A worker reads its pieces, skips and counts bad records,
   applies the filters, tokenizes in batches, routes each document to train/valid/test by a
   hash of its text, and streams the tokens into per-unit ``.bin/.idx`` files under
   ``<output>/.work/<fingerprint>/units/``; when the unit is complete it writes a completion
   marker atomically. Memory per worker is one batch, independent of dataset size. Several
   processes (Slurm tasks on many nodes, ``PrepTask``) share the units by claiming them.
3. Assemble (task 0): per dataset and split, the units' documents are concatenated in unit
   order and cut into shards of near-equal tokens, written with ``blend.json`` and
   ``metadata.json`` into ``.work/<fingerprint>/staging/``. Only then is the new build swapped
   in place of the old one (journaled; ``metadata.json`` moved last, its presence marks the
   output complete): a failed prep never touches the previous output.

Resume: a rerun after an interruption (even kill -9, of one task or all) reuses completed units
and staged shards, redoes the rest and finishes an interrupted swap. Because the document order
and the assignment of documents to shards depend only on the inputs and the config (never on
timing, the number of workers or tasks, or the unit sizes), the result is byte-identical to an
uninterrupted one-process run.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import platform
import queue
import re
import select
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nemotron import __version__
from nemotron.data import sources as src
from nemotron.data.blend import (
    SPLITS,
    Blend,
    BlendEntry,
    ShardWeight,
    check_job_dir_apart,
    load_blend,
    shard_weights,
    source_directory,
    write_split_blend,
)
from nemotron.data.config import DataPrepConfig, available_cpus, too_many_workers
from nemotron.data.indexed import (
    IndexedDataset,
    IndexedDatasetWriter,
    bin_path,
    prefix_exists,
    seal_difference,
    shard_seal,
)
from nemotron.data.tokenizers import ResolvedTokenizer, Tokenizer, resolve_tokenizer
from nemotron.utils.fs import LockBusy, atomic_write_text, exclusive_lock, remove_stale_temporaries

ARTIFACT_TYPE = "DataBlendsArtifact-pretrain"
FORMAT_VERSION = 1
WORK_DIR = ".work"
MAX_LOCATIONS = 5  # bad-record locations reported per source
BATCH_DOCS = 1024
BATCH_CHARS = 1 << 20
COPY_CHUNK_BYTES = 64 << 20
SHARD_NAME = re.compile(r"^.+_\d{5}\.(bin|idx)$")
# Temporary files of the atomic writers (``.NAME.<pid>[.-<hex>].tmp``), left only by a kill.
TEMP_NAME = re.compile(r"^\..+\.\d+([.-][0-9a-f]+)?\.tmp$")
UNITS_PER_WORKER = 8
MIN_UNIT_BYTES = 1 << 20
# Work units one prep may plan: each is several files and a task (~1 KiB in memory, a row of
# plan.json). The real recipe's inputs (tens of TB at the default 64 MB) make about a million;
# a work_unit_mb absurd for the input (1e-6: one unit per byte) would plan for hours, then
# fail for memory.
MAX_UNITS = 10_000_000


class DataPrepError(ValueError):
    """Data prep cannot produce a valid output; the message names the source or setting."""


@dataclass
class PrepProgress:
    """One progress report (the CLI renders it; the library never prints)."""

    phase: str  # plan | tokenize | assemble | done
    units_done: int = 0
    units_total: int = 0
    documents: int = 0
    tokens: int = 0
    bytes_read: int = 0
    elapsed_s: float = 0.0
    message: str = ""
    warning: str = ""  # e.g. a plan that leaves cores idle
    tasks: dict[str, int] = field(default_factory=dict)  # several tasks: units done by each

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


ProgressCallback = Callable[[PrepProgress], None]


@dataclass
class DatasetSplitSummary:
    dataset: str
    split: str
    documents: int
    tokens: int
    share: float  # this dataset's share of the split's blend weight
    files: int  # number of shard prefixes


@dataclass
class DataPrepResult:
    output_dir: Path
    blend_path: Path
    metadata_path: Path
    fingerprint: str
    cached: bool  # True: the output was already complete for this fingerprint; nothing was done
    summary: list[DatasetSplitSummary]
    bad_records: dict[str, dict[str, int]]  # dataset -> kind -> count
    bad_locations: dict[str, list[str]]  # dataset -> first few "file:line (kind)"
    elapsed_s: float
    units_reused: int = 0  # work units found complete from an interrupted run
    cpu_s: float = 0.0  # CPU seconds of this run: the calling process plus the worker processes
    warnings: list[str] = field(default_factory=list)  # e.g. a plan that leaves cores idle
    units_done_here: int = 0  # work units this process (task) tokenized; other tasks: no summary

    def totals(self, split: str = "train") -> tuple[int, int]:
        rows = [row for row in self.summary if row.split == split]
        return sum(r.documents for r in rows), sum(r.tokens for r in rows)


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class UnitSpec:
    """One unit of tokenization work: pieces of one dataset, read in order."""

    unit_id: str
    dataset: str
    dataset_index: int
    unit_index: int
    pieces: tuple[src.Piece, ...]
    row_limit: int | None
    text_field: str
    valid_fraction: float
    test_fraction: float
    min_doc_chars: int | None
    max_doc_tokens: int | None
    out_dir: str

    def prefix(self, split: str) -> Path:
        return Path(self.out_dir) / f"{self.unit_id}.{split}"

    @property
    def marker(self) -> Path:
        return Path(self.out_dir) / f"{self.unit_id}.done.json"


@dataclass
class _DatasetPlan:
    entry: BlendEntry
    source: src.SourcePlan
    text_field: str
    valid_fraction: float
    test_fraction: float
    min_doc_chars: int | None
    max_doc_tokens: int | None


def _resolve_blend_path(cfg: DataPrepConfig, recipe_dir: Path | None) -> Path:
    path = Path(cfg.blend_path).expanduser()
    if not path.is_absolute() and recipe_dir is not None:
        path = Path(recipe_dir) / path
    return path.resolve()


def _validate_config(cfg: DataPrepConfig) -> None:
    def fail(key, message):
        raise DataPrepError(f"data prep config: {key} {message}")

    for key in ("num_shards", "valid_shards", "test_shards"):
        if not isinstance(getattr(cfg, key), int) or getattr(cfg, key) < 1:
            fail(key, f"must be a positive integer, got {getattr(cfg, key)!r}")
    for key in ("valid_fraction", "test_fraction"):
        value = getattr(cfg, key)
        if not 0.0 <= value < 1.0:
            fail(key, f"must be in [0, 1), got {value!r}")
    if cfg.valid_fraction + cfg.test_fraction >= 1.0:
        fail("valid_fraction + test_fraction", "must be < 1")
    for key in ("min_doc_chars", "max_doc_tokens", "sample", "num_workers"):
        value = getattr(cfg, key)
        if value is not None and (not isinstance(value, int) or value < 1):
            fail(key, f"must be a positive integer or null, got {value!r}")
    if not 0.0 <= cfg.max_bad_record_fraction <= 1.0:
        fail("max_bad_record_fraction", f"must be in [0, 1], got {cfg.max_bad_record_fraction!r}")
    if not (math.isfinite(cfg.work_unit_mb) and cfg.work_unit_mb > 0):  # int(inf) bytes: OverflowError
        fail("work_unit_mb", f"must be a finite number > 0, got {cfg.work_unit_mb!r}")


def _plan_datasets(cfg: DataPrepConfig, blend: Blend, base_dir: Path) -> list[_DatasetPlan]:
    plans = []
    piece_bytes = max(1, int(cfg.work_unit_mb * (1 << 20)))
    for entry in blend:
        try:
            source = src.plan_source(
                entry.path,
                subset=entry.subset,
                revision=entry.revision,
                hf_split=entry.hf_split,
                base_dir=base_dir,
                piece_bytes=piece_bytes,
            )
        except src.SourceError as error:
            raise DataPrepError(f"{blend.source}: dataset {entry.name!r}: {error}") from error
        plans.append(
            _DatasetPlan(
                entry=entry,
                source=source,
                text_field=entry.text_field or cfg.text_field,
                valid_fraction=cfg.valid_fraction if entry.valid_fraction is None else entry.valid_fraction,
                test_fraction=cfg.test_fraction if entry.test_fraction is None else entry.test_fraction,
                min_doc_chars=entry.min_doc_chars if entry.min_doc_chars is not None else cfg.min_doc_chars,
                max_doc_tokens=entry.max_doc_tokens
                if entry.max_doc_tokens is not None
                else cfg.max_doc_tokens,
            )
        )
    return plans


def _owned_by_output(path: Path, output_dir: Path) -> bool:
    """Whether `path` is one of the files a build writes or replaces in `output_dir`."""
    if path in (output_dir / "blend.json", output_dir / "metadata.json"):
        return True
    return any(path.is_relative_to(output_dir / part) for part in (*SPLITS, WORK_DIR))


def _check_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise DataPrepError(f"output_dir {output_dir} is a file, not a directory")


def _check_output_apart(
    output_dir: Path,
    blend: Blend,
    blend_path: Path,
    base_dir: Path,
    plans: list[_DatasetPlan],
    job_dir: Path | None = None,
) -> None:
    """The output must not overlap the input: a build replaces `blend.json` and
    `metadata.json` in `output_dir` (a blend definition of that name there was deleted), and a
    directory source containing `output_dir` reads the previous build's JSON files (and
    `.work/`) as records on the next run. Nor may a source hold the job directory
    (`check_job_dir_apart`)."""
    if _owned_by_output(blend_path, output_dir):
        raise DataPrepError(
            f"the blend definition {blend_path} is a file data prep writes in output_dir "
            f"{output_dir}: it would be replaced; choose another output_dir"
        )
    for plan in plans:
        where = f"{blend.source}: dataset {plan.entry.name!r}"
        for info in plan.source.description.get("files", ()):
            if _owned_by_output(Path(info["path"]).resolve(), output_dir):
                raise DataPrepError(
                    f"{where}: source file {info['path']} is part of the output in {output_dir}; "
                    "choose another output_dir"
                )
            if job_dir is not None and Path(info["path"]).resolve().is_relative_to(job_dir.resolve()):
                raise DataPrepError(
                    f"{where}: source file {info['path']} is in the job directory {job_dir}; "
                    "give --job-dir elsewhere"
                )
        directory = source_directory(plan.entry.path, base_dir)
        if directory is not None and output_dir.is_relative_to(directory):
            raise DataPrepError(
                f"{where}: output_dir {output_dir} is inside (or is) its source directory "
                f"{directory}, so the output would be read as input on the next run; "
                "choose an output_dir outside it"
            )
    if job_dir is not None:
        check_job_dir_apart(blend, base_dir, job_dir)


def _fingerprint(cfg: DataPrepConfig, plans: list[_DatasetPlan], tokenizer_identity: str) -> str:
    payload = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_identity,
        "config": {
            key: getattr(cfg, key)
            for key in (
                "num_shards",
                "valid_shards",
                "test_shards",
                "valid_fraction",
                "test_fraction",
                "text_field",
                "min_doc_chars",
                "max_doc_tokens",
                "sample",
                "max_bad_record_fraction",
            )
        },
        "datasets": [
            {
                "entry": asdict(plan.entry),
                "source": plan.source.description,
                "text_field": plan.text_field,
                "valid_fraction": plan.valid_fraction,
                "test_fraction": plan.test_fraction,
                "min_doc_chars": plan.min_doc_chars,
                "max_doc_tokens": plan.max_doc_tokens,
            }
            for plan in plans
        ],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def unit_bytes_for(total_bytes: int, workers: int, cap_mb: float) -> int:
    """Target bytes of one work unit: the input spread over UNITS_PER_WORKER units per worker
    (so that uneven units even out and every core stays busy to the end), at least
    MIN_UNIT_BYTES (per-unit overhead) and at most ``work_unit_mb`` (resume granularity)."""
    cap = max(1, int(cap_mb * (1 << 20)))
    per_unit = -(-max(0, total_bytes) // (UNITS_PER_WORKER * max(1, workers)))
    return min(cap, max(MIN_UNIT_BYTES, per_unit))


def _units(plans: list[_DatasetPlan], sample: int | None, out_dir: Path, unit_bytes: int) -> list[UnitSpec]:
    """Work units: large pieces split (plain jsonl byte ranges), small ones grouped, each unit
    about ``unit_bytes`` of text. Units hold consecutive pieces of one dataset, so reading the
    units in order reads the dataset in order, however it was cut."""
    units = []
    for dataset_index, plan in enumerate(plans):
        if sample:
            # The first N rows of the dataset are wanted: one unit reads the pieces in order
            # and stops after N rows.
            groups = [tuple(plan.source.pieces)]
        else:
            groups = _group_pieces(src.split_pieces(plan.source.pieces, unit_bytes), unit_bytes)
        for unit_index, pieces in enumerate(groups):
            key = hashlib.sha1(repr((pieces, sample)).encode()).hexdigest()[:12]
            units.append(
                UnitSpec(
                    unit_id=f"{dataset_index:04d}-{unit_index:06d}-{key}",
                    dataset=plan.entry.name,
                    dataset_index=dataset_index,
                    unit_index=unit_index,
                    pieces=pieces,
                    row_limit=sample,
                    text_field=plan.text_field,
                    valid_fraction=plan.valid_fraction,
                    test_fraction=plan.test_fraction,
                    min_doc_chars=plan.min_doc_chars,
                    max_doc_tokens=plan.max_doc_tokens,
                    out_dir=str(out_dir),
                )
            )
    return units


def _group_pieces(pieces: list[src.Piece], unit_bytes: int) -> list[tuple[src.Piece, ...]]:
    """Consecutive pieces grouped up to ``unit_bytes``; a piece of unknown size (a hub shard)
    is a unit of its own."""
    groups: list[tuple[src.Piece, ...]] = []
    current: list[src.Piece] = []
    size = 0
    for piece in pieces:
        if piece.size < 0 or (current and size + piece.size > unit_bytes):
            if current:
                groups.append(tuple(current))
            current, size = [], 0
        if piece.size < 0:
            groups.append((piece,))
            continue
        current.append(piece)
        size += piece.size
    if current:
        groups.append(tuple(current))
    return groups


def _save_units(path: Path, units: list[UnitSpec]) -> None:
    rows = [{**asdict(unit), "out_dir": None} for unit in units]
    atomic_write_text(path, json.dumps({"units": rows}, sort_keys=True) + "\n")


def _load_units(path: Path, out_dir: Path) -> list[UnitSpec]:
    try:
        rows = json.loads(path.read_text())["units"]
        units = []
        for row in rows:
            pieces = tuple(src.Piece(**{**piece, "files": tuple(piece["files"])}) for piece in row["pieces"])
            units.append(UnitSpec(**{**row, "pieces": pieces, "out_dir": str(out_dir)}))
        return units
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataPrepError(f"{path}: unreadable work plan ({error}); rerun with --force") from None


# ---------------------------------------------------------------------------------------------
# Tokenization (runs in worker processes)

_WORKER: dict = {}


# A worker is one process on one core: the tokenizer's own thread pool stays off (HF
# tokenizers reads TOKENIZERS_PARALLELISM at every batch call; rayon reads RAYON_NUM_THREADS
# when its pool starts).
SINGLE_THREAD_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}


def _init_worker(
    resolved: ResolvedTokenizer | Tokenizer,
    progress_queue,
    single_threaded: bool = True,
    caller_pid: int | None = None,
) -> None:
    if caller_pid is not None:
        _exit_with(caller_pid)
    if single_threaded:
        os.environ.update(SINGLE_THREAD_ENV)
    _WORKER["tokenizer"] = resolved if isinstance(resolved, Tokenizer) else Tokenizer(resolved)
    _WORKER["queue"] = progress_queue


def _exit_with(pid: int) -> None:
    """End this worker process as soon as process `pid` (the prep that started it) is gone.

    A pool's workers are ended by the pool's shutdown; when the prep is killed (kill -9, or a
    SIGTERM it does not handle) nothing shuts the pool down, and each worker would wait on its
    task queue for ever (it holds that queue's write end itself), keeping the forkserver, the
    resource tracker and the prep's stdout/stderr alive with it: a caller reading the prep's
    output until it closes (`subprocess.run(..., capture_output=True)`) would never return.
    A daemon thread waits for `pid` to exit (a pidfd on Linux, else a poll once a second);
    a unit cut short here leaves only temporary files, as any kill does."""

    def alive() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # (a process of another user: ours is not that)
            return True
        return True

    try:
        fd: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # not Linux, or a kernel before 5.3
        fd = None

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])  # readable once the process has exited
        else:
            while alive():
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="nemotron-prep-watch", daemon=True).start()


@contextlib.contextmanager
def _single_threaded_here():
    """The calling process as one single-core worker; its environment is restored after."""
    saved = {key: os.environ.get(key) for key in SINGLE_THREAD_ENV}
    os.environ.update(SINGLE_THREAD_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _DirectReport:
    """Stands in for the progress queue when units run in the calling process."""

    def __init__(self, emit):
        self._emit = emit

    def put(self, item: dict) -> None:
        self._emit(documents=item["documents"], tokens=item["tokens"], bytes_read=item["bytes"])


def _split_of(data: bytes, valid_fraction: float, test_fraction: float) -> str:
    # Deterministic by content: the same document lands in the same split in every run.
    value = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") / 2.0**64
    if value < valid_fraction:
        return "valid"
    if value < valid_fraction + test_fraction:
        return "test"
    return "train"


def _process_unit(spec: UnitSpec) -> dict:
    tokenizer: Tokenizer = _WORKER["tokenizer"]
    report = _WORKER.get("queue")
    dtype = tokenizer.dtype
    stats: dict[str, Any] = {
        "unit_id": spec.unit_id,
        "dataset": spec.dataset,
        "rows": 0,
        "bad": {kind: 0 for kind in src.BAD_KINDS},
        "bad_locations": [],
        "filtered_short": 0,
        "filtered_long": 0,
        "documents": {split: 0 for split in SPLITS},
        "tokens": {split: 0 for split in SPLITS},
        "chars": 0,
    }
    Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
    writers = {split: IndexedDatasetWriter(spec.prefix(split), dtype) for split in SPLITS}
    texts: list[str] = []
    routes: list[str] = []
    batch_chars = 0
    pending = {"documents": 0, "tokens": 0, "bytes": 0}
    last_report = time.monotonic()

    def flush() -> None:
        nonlocal batch_chars, last_report
        if not texts:
            return
        encoded = tokenizer.encode_batch(texts)
        per_split: dict[str, list[list[int]]] = {split: [] for split in SPLITS}
        for ids, split in zip(encoded, routes):
            if spec.max_doc_tokens is not None and len(ids) > spec.max_doc_tokens:
                stats["filtered_long"] += 1
                continue
            per_split[split].append(ids)
        for split, docs in per_split.items():
            if not docs:
                continue
            lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
            total = int(lengths.sum())
            flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=dtype, count=total)
            writers[split].add_raw(flat.tobytes(), lengths)
            stats["documents"][split] += len(docs)
            stats["tokens"][split] += total
            pending["documents"] += len(docs)
            pending["tokens"] += total
        pending["bytes"] += batch_chars
        texts.clear()
        routes.clear()
        batch_chars = 0
        now = time.monotonic()
        if report is not None and now - last_report > 0.5:
            report.put(dict(pending))
            pending.update(documents=0, tokens=0, bytes=0)
            last_report = now

    try:
        records: Iterator[src.Record] = itertools.chain.from_iterable(
            src.iter_records(p, spec.text_field) for p in spec.pieces
        )
        if spec.row_limit is not None:
            records = itertools.islice(records, spec.row_limit)
        for record in records:
            stats["rows"] += 1
            if record.bad_kind is not None:
                stats["bad"][record.bad_kind] += 1
                if len(stats["bad_locations"]) < MAX_LOCATIONS:
                    stats["bad_locations"].append([list(record.location), record.bad_kind])
                continue
            text = record.text
            assert text is not None  # only a bad record has no text
            if spec.min_doc_chars is not None and len(text) < spec.min_doc_chars:
                stats["filtered_short"] += 1
                continue
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates from a JSON \ud800 escape
                stats["bad"][src.NON_UTF8] += 1
                if len(stats["bad_locations"]) < MAX_LOCATIONS:
                    stats["bad_locations"].append([list(record.location), src.NON_UTF8])
                continue
            texts.append(text)
            routes.append(_split_of(data, spec.valid_fraction, spec.test_fraction))
            batch_chars += len(data)
            stats["chars"] += len(text)  # characters, as min_doc_chars counts them (not UTF-8 bytes)
            if len(texts) >= BATCH_DOCS or batch_chars >= BATCH_CHARS:
                flush()
        flush()
        for split in SPLITS:
            writers[split].finalize()
    except BaseException as error:
        for writer in writers.values():
            writer.discard()
        if isinstance(error, src.SourceError):
            raise DataPrepError(f"dataset {spec.dataset!r}: {error}") from None
        raise
    if report is not None and any(pending.values()):
        report.put(dict(pending))
    atomic_write_text(spec.marker, json.dumps(stats, sort_keys=True))
    # The worker's CPU time so far (start-up included) is returned but not written to the
    # marker: markers are deterministic.
    return {**stats, "pid": os.getpid(), "process_cpu_s": time.process_time()}


# ---------------------------------------------------------------------------------------------
# Assembly


@dataclass
class _Segment:
    prefix: Path  # unit prefix
    start: int  # first document
    stop: int  # one past the last document


@dataclass
class _ShardPlan:
    dataset: str
    split: str
    prefix: Path  # final output prefix (what blend.json and metadata.json name)
    staged: Path = Path()  # where it is written: the build's staging directory
    segments: list[_Segment] = field(default_factory=list)
    documents: int = 0
    tokens: int = 0


def _split_segments(units: list[UnitSpec], split: str) -> list[_Segment]:
    segments = []
    for unit in units:
        count = len(IndexedDataset(unit.prefix(split)))
        if count:
            segments.append(_Segment(unit.prefix(split), 0, count))
    return segments


def _ensure_coverage(segments: dict[str, list[_Segment]], fractions: dict[str, float]) -> None:
    """Give valid/test at least one document of the dataset when they would have none.

    Routing by hash gives a tiny dataset no held-out documents at the default fractions; then
    the first training document(s) move to the empty split, so valid and test draw from every
    dataset. Deterministic: it depends only on the unit outputs.
    """
    for split in ("valid", "test"):
        if fractions[split] <= 0 or segments[split]:
            continue
        train = segments["train"]
        if sum(s.stop - s.start for s in train) < 2:
            continue
        first = train[0]
        segments[split] = [_Segment(first.prefix, first.start, first.start + 1)]
        first.start += 1
        if first.start == first.stop:
            train.pop(0)


def _cut_into_shards(
    dataset: str, split: str, segments: list[_Segment], num_shards: int, output_dir: Path, staging_dir: Path
) -> list[_ShardPlan]:
    """Contiguous shards of near-equal tokens: a document goes to shard floor(tokens_before * n / total)."""

    def lengths_of(segment: _Segment) -> np.ndarray:
        return IndexedDataset(segment.prefix).sequence_lengths[segment.start : segment.stop].astype(np.int64)

    # Two passes, one segment's lengths in memory at a time: memory is bounded by the work-unit
    # size, not by the dataset's size.
    total = sum(int(lengths_of(segment).sum()) for segment in segments)
    if total == 0:
        return []
    if total * num_shards >= 2**63:  # tokens_before * n in int64 below would wrap around silently
        key = {"train": "num_shards", "valid": "valid_shards", "test": "test_shards"}[split]
        raise DataPrepError(
            f"data prep config: {key} {num_shards} is too many for the {total:,} {split} tokens of "
            f"{dataset} (their product must stay below 2**63)"
        )
    shards: dict[int, _ShardPlan] = {}
    before = 0
    for segment in segments:
        lengths = lengths_of(segment)
        cumulative = np.concatenate(([0], np.cumsum(lengths)[:-1])) + before
        assignment = np.minimum(cumulative * num_shards // total, num_shards - 1)
        before += int(lengths.sum())
        # Runs of equal shard index within this segment.
        boundaries = np.flatnonzero(np.diff(assignment)) + 1
        starts = np.concatenate(([0], boundaries))
        stops = np.concatenate((boundaries, [lengths.size]))
        for run_start, run_stop in zip(starts.tolist(), stops.tolist()):
            shard = int(assignment[run_start])
            plan = shards.setdefault(shard, _ShardPlan(dataset, split, Path()))
            plan.segments.append(
                _Segment(segment.prefix, segment.start + run_start, segment.start + run_stop)
            )
            plan.documents += run_stop - run_start
            plan.tokens += int(lengths[run_start:run_stop].sum())
    ordered = [shards[k] for k in sorted(shards)]
    for number, plan in enumerate(ordered):  # empty shards are dropped; numbering stays dense
        plan.prefix = output_dir / split / f"{dataset}_{number:05d}"
        plan.staged = staging_dir / split / f"{dataset}_{number:05d}"
    return ordered


def _write_shard(plan: _ShardPlan, dtype) -> None:
    if prefix_exists(plan.staged):
        return  # written by an interrupted run of the same fingerprint (renamed only when complete)
    with IndexedDatasetWriter(plan.staged, dtype) as writer:
        for segment in plan.segments:
            source = IndexedDataset(segment.prefix)
            itemsize = source.dtype.itemsize
            raw = np.memmap(bin_path(segment.prefix), dtype=np.uint8, mode="r") if source.num_tokens else None
            doc = segment.start
            while doc < segment.stop:
                # Copy whole documents, at most COPY_CHUNK_BYTES at a time (bounded memory).
                budget = COPY_CHUNK_BYTES // itemsize
                ends = np.cumsum(source.sequence_lengths[doc : segment.stop].astype(np.int64))
                stop = doc + max(1, int(np.searchsorted(ends, budget, side="right")))
                lengths = source.sequence_lengths[doc:stop]
                begin = int(source.sequence_pointers[doc])
                end = begin + int(lengths.sum(dtype=np.int64)) * itemsize
                writer.add_raw(raw[begin:end].tobytes() if raw is not None else b"", lengths)
                doc = stop


SHARD_WRITER_THREADS = 8


def _write_shards(shards: list[_ShardPlan], dtype) -> None:
    """Shards are copies of unit files, bound by I/O and by the fsync of each file: a few
    threads overlap those waits (the GIL is released in both)."""
    with futures.ThreadPoolExecutor(max_workers=SHARD_WRITER_THREADS) as pool:
        for done in [pool.submit(_write_shard, shard, dtype) for shard in shards]:
            done.result()  # in order: the first error is raised


# ---------------------------------------------------------------------------------------------
# Several processes (Slurm tasks, one per node or more) sharing one data prep


@dataclass(frozen=True)
class PrepTask:
    """This process's place among the processes that share one data prep.

    All tasks tokenize: each claims work units one at a time (an exclusive create of a claim
    file on the shared filesystem), so faster nodes take more units. Task 0 also plans (and
    announces the plan to the others), waits for every unit, then assembles and swaps the
    output in. ``attempt`` is shared by the tasks of one launch (claims are per attempt: a
    rerun reclaims the units a failed attempt left unfinished and reuses the finished ones).
    """

    rank: int = 0
    world: int = 1
    attempt: str = ""
    host: str = field(default_factory=socket.gethostname)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_slurm(cls, environ: dict[str, str]) -> "PrepTask":
        """The task of a Slurm job step (``srun``): SLURM_PROCID of SLURM_NTASKS, attempt =
        job and step id."""
        try:
            rank = int(environ["SLURM_PROCID"])
            world = int(environ.get("SLURM_STEP_NUM_TASKS") or environ["SLURM_NTASKS"])
            attempt = f"slurm-{environ['SLURM_JOB_ID']}.{environ.get('SLURM_STEP_ID', '0')}"
        except (KeyError, ValueError) as error:
            raise DataPrepError(f"not inside a Slurm job step (srun): missing or bad {error}") from None
        if not 0 <= rank < world:
            raise DataPrepError(f"SLURM_PROCID {rank} is outside the {world} tasks of the step")
        return cls(rank=rank, world=world, attempt=attempt)


POLL_SECONDS = 0.5
FOLLOWER_WAIT_S = 3600.0  # how long a task waits for task 0's plan (hub planning can be slow)


def _attempt_file(output_dir: Path, task: PrepTask) -> Path:
    return output_dir / WORK_DIR / "attempts" / f"{task.attempt}.json"


def _announce(output_dir: Path, task: PrepTask, **fields) -> None:
    """Task 0 tells the other tasks of this attempt what to do (nothing for one task)."""
    if task.world > 1:
        atomic_write_text(_attempt_file(output_dir, task), json.dumps(fields, sort_keys=True) + "\n")


def _claimer(work_dir: Path, task: PrepTask) -> Callable[[UnitSpec], bool] | None:
    if task.world == 1:
        return None
    claims = work_dir / "claims" / task.attempt
    claims.mkdir(parents=True, exist_ok=True)

    def claim(unit: UnitSpec) -> bool:
        try:
            os.close(os.open(claims / unit.unit_id, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    return claim


class _TaskBoard:
    """Per-task status files (units done, tokens, state), the source of the per-node
    progress and of a failed task's error for the others."""

    def __init__(self, work_dir: Path, task: PrepTask, workers: int):
        self.directory = work_dir / "tasks" / task.attempt
        self.task, self.workers = task, workers
        self.units = self.tokens = 0
        self._written = 0.0

    def counting(self, emit: Callable[..., None]) -> Callable[..., None]:
        """``emit`` that also counts this task's units and tokens."""

        def counted(*args, **kwargs) -> None:
            self.units += kwargs.get("units", 0)
            self.tokens += kwargs.get("tokens", 0)
            emit(*args, **kwargs)

        return counted

    def record(self, state: str = "running", error: str = "", force: bool = False) -> None:
        if self.task.world == 1:
            return
        now = time.monotonic()
        if not force and now - self._written < 1.0:
            return
        self._written = now
        atomic_write_text(
            self.directory / f"{self.task.rank:05d}.json",
            json.dumps(
                {
                    "rank": self.task.rank,
                    "host": self.task.host,
                    "workers": self.workers,
                    "units": self.units,
                    "tokens": self.tokens,
                    "state": state,
                    "error": error,
                }
            ),
        )

    def read(self) -> list[dict]:
        rows = []
        for path in sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []:
            try:
                rows.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # being replaced; next poll
        return rows


# ---------------------------------------------------------------------------------------------
# Orchestration


def _move(source: Path, target: Path) -> None:
    if source.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)


def _swap_in(output_dir: Path, work_dir: Path) -> None:
    """Put the complete build staged in ``work_dir/staging`` in place of the output.

    Journaled, so that a kill at any moment is finished by the next run (``_finish_swap``):
    the older build is moved aside (metadata.json first: from then on it no longer looks
    complete), the new files are moved in, and the new metadata.json is moved in last."""
    atomic_write_text(work_dir / "swap.json", json.dumps({"state": "move_old"}) + "\n")
    _finish_swap(output_dir, work_dir)


def _finish_swap(output_dir: Path, work_dir: Path) -> None:
    journal = work_dir / "swap.json"
    staging, previous = work_dir / "staging", work_dir / "previous"
    if json.loads(journal.read_text()).get("state") == "move_old":
        for name in ("metadata.json", "blend.json"):
            _move(output_dir / name, previous / name)
        for split in SPLITS:
            directory = output_dir / split
            for path in sorted(directory.iterdir()) if directory.is_dir() else []:
                if path.is_file() and SHARD_NAME.match(path.name):
                    _move(path, previous / split / path.name)
        atomic_write_text(journal, json.dumps({"state": "move_new"}) + "\n")
    for split in SPLITS:
        directory = staging / split
        for path in sorted(directory.iterdir()) if directory.is_dir() else []:
            if SHARD_NAME.match(path.name):
                _move(path, output_dir / split / path.name)
    _move(staging / "blend.json", output_dir / "blend.json")
    _move(staging / "metadata.json", output_dir / "metadata.json")
    _remove_stray_temps(output_dir)


def _remove_stray_temps(output_dir: Path) -> None:
    """Temporary files a killed writer left beside the output (older versions wrote them there)."""
    for directory in (output_dir, *(output_dir / split for split in SPLITS)):
        for path in directory.iterdir() if directory.is_dir() else []:
            if path.is_file() and TEMP_NAME.match(path.name):
                path.unlink(missing_ok=True)


def _finish_pending_swaps(output_dir: Path) -> None:
    """A build killed while being swapped in was complete: finish its swap."""
    work_root = output_dir / WORK_DIR
    for journal in sorted(work_root.glob("*/swap.json"), key=lambda p: p.stat().st_mtime):
        _finish_swap(output_dir, journal.parent)
        shutil.rmtree(journal.parent, ignore_errors=True)


def _cached_result(output_dir: Path, fingerprint: str) -> DataPrepResult | None:
    """The result of the complete build in `output_dir` when it is this fingerprint's, every
    shard there and matching its seal; None otherwise (a record that is not one included:
    rebuilt, not trusted)."""
    metadata_path = output_dir / "metadata.json"
    try:
        metadata = json.loads(metadata_path.read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: nested too deeply
        return None
    try:
        if metadata.get("fingerprint") != fingerprint or not (output_dir / "blend.json").is_file():
            return None
        for shards in metadata.get("splits", {}).values():
            if not all(prefix_exists(shard["prefix"]) for shard in shards):
                return None
            # A shard changed since (truncated, swapped, rewritten) is not this build: built again.
            if any(
                "seal" in shard
                and seal_difference(shard["prefix"], shard["seal"] if isinstance(shard["seal"], dict) else {})
                for shard in shards
            ):
                return None
        return _checked_recorded_result(
            _result_from_metadata(output_dir, metadata, cached=True, elapsed=0.0, reused=0)
        )
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _checked_recorded_result(result: DataPrepResult) -> DataPrepResult:
    """`result` as read from a metadata.json, or TypeError where a field is not of the type a
    build writes (a record edited or damaged by hand: the cached run would report it, or fail
    drawing its summary, instead of rebuilding)."""

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def share(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1

    if not isinstance(result.fingerprint, str):
        raise TypeError("fingerprint")
    for row in result.summary:
        if not (
            isinstance(row.dataset, str)
            and row.split in SPLITS
            and count(row.documents)
            and count(row.tokens)
            and share(row.share)
            and count(row.files)
        ):
            raise TypeError(f"summary row {row}")
    for name, kinds in result.bad_records.items():
        if not (isinstance(kinds, dict) and all(isinstance(k, str) and count(v) for k, v in kinds.items())):
            raise TypeError(f"bad_records of {name!r}")
    for name, locations in result.bad_locations.items():
        if not (isinstance(locations, list) and all(isinstance(x, str) for x in locations)):
            raise TypeError(f"bad_locations of {name!r}")
    return result


def _refuse_sample_over_full_build(cfg: DataPrepConfig, output_dir: Path) -> None:
    """A sample run (``sample``) must not replace a complete full build unless forced."""
    if cfg.sample is None or cfg.force:
        return
    try:
        metadata = json.loads((output_dir / "metadata.json").read_text())
    except (OSError, ValueError, RecursionError):  # no record, or one that is not: not a full build
        return
    config = metadata.get("config") if isinstance(metadata, dict) else None
    if isinstance(config, dict) and config.get("sample") is None and "fingerprint" in metadata:
        counts = metadata.get("counts")
        train = counts.get("train") if isinstance(counts, dict) else None
        documents = train.get("documents", "?") if isinstance(train, dict) else "?"
        raise DataPrepError(
            f"{output_dir} holds a complete full build ({output_dir / 'metadata.json'}: "
            f"{documents} train documents); a sample run (sample={cfg.sample}) would replace it: "
            f"give the sample its own output_dir, or add --force (force=true) to replace it"
        )


def _refuse_foreign_output(cfg: DataPrepConfig, output_dir: Path) -> None:
    """A build replaces blend.json and every shard-named file of the split directories: an
    output_dir with no prep metadata.json (another tool's data, e.g. Megatron shards put
    under train/, or a directory named by mistake) is refused unless forced."""
    if cfg.force:
        return
    try:
        ours = "fingerprint" in json.loads((output_dir / "metadata.json").read_text())
    except FileNotFoundError:
        ours = False
    except (OSError, ValueError, TypeError, RecursionError):  # damaged: prep's own name, rebuilt as before
        ours = True
    if ours:
        return
    replaced = [output_dir / "blend.json"] if (output_dir / "blend.json").exists() else []
    for split in SPLITS:
        directory = output_dir / split
        files = sorted(directory.iterdir()) if directory.is_dir() else []
        replaced += [p for p in files if p.is_file() and SHARD_NAME.match(p.name)]
    if replaced:
        more = f" (and {len(replaced) - 1} more)" if len(replaced) > 1 else ""
        raise DataPrepError(
            f"{output_dir} holds {replaced[0]}{more} but no prep metadata.json: not an earlier "
            f"prep output, and a build would replace it: give prep another output_dir, or add "
            f"--force (force=true) to replace it"
        )


def _result_from_metadata(
    output_dir: Path, metadata: dict, cached: bool, elapsed: float, reused: int
) -> DataPrepResult:
    return DataPrepResult(
        output_dir=output_dir,
        blend_path=output_dir / "blend.json",
        metadata_path=output_dir / "metadata.json",
        fingerprint=metadata["fingerprint"],
        cached=cached,
        summary=[DatasetSplitSummary(**row) for row in metadata["summary"]],
        bad_records={s["name"]: s["bad_records"] for s in metadata["sources"]},
        bad_locations={s["name"]: s["bad_locations"] for s in metadata["sources"]},
        elapsed_s=elapsed,
        units_reused=reused,
    )


def _source_checks(cfg: DataPrepConfig, plan: _DatasetPlan, stats: list[dict]) -> dict:
    name = plan.entry.name
    rows = sum(s["rows"] for s in stats)
    bad = {kind: sum(s["bad"][kind] for s in stats) for kind in src.BAD_KINDS}
    locations: list[str] = []
    for s in stats:
        for location, kind in s["bad_locations"]:
            if len(locations) < MAX_LOCATIONS:
                locations.append(f"{src.format_location(tuple(location))} ({kind})")
    documents = {split: sum(s["documents"][split] for s in stats) for split in SPLITS}
    tokens = {split: sum(s["tokens"][split] for s in stats) for split in SPLITS}
    bad_total = sum(bad.values())
    where = f"dataset {name!r} ({plan.entry.path})"
    if rows == 0:
        raise DataPrepError(f"{where} yielded no records")
    if bad_total / rows > cfg.max_bad_record_fraction:
        detail = ", ".join(f"{k} {v}" for k, v in bad.items() if v)
        raise DataPrepError(
            f"{where}: {bad_total} of {rows} records are bad ({detail}), more than "
            f"max_bad_record_fraction={cfg.max_bad_record_fraction}; first at: {'; '.join(locations)}"
        )
    if sum(documents.values()) == 0:
        filtered = sum(s["filtered_short"] + s["filtered_long"] for s in stats)
        raise DataPrepError(
            f"{where} yielded no documents ({rows} records: {bad_total} bad, {filtered} filtered by "
            f"min_doc_chars/max_doc_tokens)"
        )
    return {
        "name": name,
        "rows": rows,
        "documents": documents,
        "tokens": tokens,
        "chars": sum(s["chars"] for s in stats),
        "bad_records": bad,
        "bad_locations": locations,
        "filtered": {
            "min_doc_chars": sum(s["filtered_short"] for s in stats),
            "max_doc_tokens": sum(s["filtered_long"] for s in stats),
        },
    }


def _run_units(
    units: list[UnitSpec],
    tokenizer: Tokenizer,
    workers: int,
    emit: Callable[..., None],
    claim: Callable[[UnitSpec], bool] | None = None,
    tick: Callable[[], None] = lambda: None,
) -> tuple[float, int]:
    """Process the units that are not complete (and that this task claims, when tasks share the
    work), ``workers`` single-core processes at a time. Returns (CPU seconds spent in worker
    processes, 0 when inline; units processed here)."""

    def todo():
        for unit in units:
            if unit.marker.is_file() or (claim is not None and not claim(unit)):
                continue
            yield unit

    queue_ = todo()
    first = next(queue_, None)
    if first is None:
        return 0.0, 0
    queue_ = itertools.chain([first], queue_)
    done = 0
    if workers == 1:
        # In the calling process: no process start-up cost; one core, like a worker.
        with _single_threaded_here():
            _init_worker(tokenizer, _DirectReport(emit), single_threaded=False)
            try:
                for unit in queue_:
                    _process_unit(unit)
                    done += 1
                    emit(units=1)
                    tick()
            finally:
                _WORKER.clear()
        return 0.0, done
    context = _worker_context()
    progress_queue = context.Queue()
    with futures.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(tokenizer.resolved, progress_queue, True, os.getpid()),
    ) as pool:
        # Units are claimed and submitted as workers free up (two per worker in flight), so
        # that tasks sharing the work take units at the pace they finish them.
        running: set[futures.Future] = set()
        worker_cpu: dict[int, float] = {}
        try:
            while True:
                while len(running) < 2 * workers:
                    unit = next(queue_, None)
                    if unit is None:
                        break
                    running.add(pool.submit(_process_unit, unit))
                if not running:
                    break
                finished, running = futures.wait(running, timeout=0.25, return_when=futures.FIRST_COMPLETED)
                _drain(progress_queue, emit)
                for future in finished:
                    stats = future.result()  # re-raises a worker's error here
                    worker_cpu[stats["pid"]] = max(worker_cpu.get(stats["pid"], 0.0), stats["process_cpu_s"])
                    done += 1
                    emit(units=1)
                tick()
        except BaseException:
            for future in running:
                future.cancel()
            raise
        finally:
            _drain(progress_queue, emit)
    return sum(worker_cpu.values()), done


def _worker_context():
    """A fresh single-threaded server process forks the workers (never fork the caller: it may
    hold threads, e.g. a progress bar's). The caller's main module is imported once, in the
    server, not once per worker as with spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__", "nemotron.data.prep"])
        return context
    return multiprocessing.get_context("spawn")


def _drain(progress_queue, emit) -> None:
    while True:
        try:
            item = progress_queue.get_nowait()
        except (queue.Empty, OSError, ValueError):
            return
        emit(documents=item["documents"], tokens=item["tokens"], bytes_read=item["bytes"])


def _idle_core_warnings(
    cfg: DataPrepConfig, task: PrepTask, workers: int, units: int, pending: int
) -> list[str]:
    """``workers``: the worker processes of this task before the plan was known."""
    warnings = []
    cpus = available_cpus()
    if cfg.num_workers is not None and cfg.num_workers < cpus:
        warnings.append(
            f"num_workers={cfg.num_workers} leaves {cpus - cfg.num_workers} of the {cpus} CPUs "
            f"this process may use idle (null = every CPU)"
        )
    total_workers = workers * task.world
    if 0 < pending < total_workers:
        warnings.append(
            f"only {pending} work units to do for {total_workers} workers: "
            f"{total_workers - pending} of them will be idle (the input is small, or "
            f"work_unit_mb={cfg.work_unit_mb:g} is too large for it)"
        )
    return warnings


class _Emitter:
    """Builds PrepProgress reports from increments (the library never prints)."""

    def __init__(self, progress: ProgressCallback | None, started: float):
        self.progress, self.started = progress, started
        self.state = PrepProgress(phase="plan")

    def __call__(
        self,
        phase: str | None = None,
        units: int = 0,
        documents: int = 0,
        tokens: int = 0,
        bytes_read: int = 0,
        message: str = "",
        warning: str = "",
    ) -> None:
        state = self.state
        if phase:
            state.phase = phase
        state.units_done += units
        state.documents += documents
        state.tokens += tokens
        state.bytes_read += bytes_read
        state.elapsed_s = time.monotonic() - self.started
        state.message = message
        state.warning = warning
        if self.progress is not None:
            self.progress(dataclasses.replace(state, tasks=dict(state.tasks)))


def run_data_prep(
    cfg: DataPrepConfig,
    recipe_dir: Path | str | None = None,
    progress: ProgressCallback | None = None,
    task: PrepTask | None = None,
    job_dir: Path | None = None,
) -> DataPrepResult:
    """Prepare the blend described by ``cfg``; see the module docstring for the pipeline.

    ``task``: this process's share when several processes (Slurm tasks) run the same prep
    into the same ``output_dir`` on a shared filesystem; None = the only one.
    ``job_dir``: where the caller writes this run's own files (none: not checked), which no
    source may contain.
    """
    task = task or PrepTask()
    started, cpu_started = time.monotonic(), time.process_time()
    _validate_config(cfg)
    problem = too_many_workers("num_workers", cfg.num_workers or 0, available_cpus())  # (each task)
    if problem:
        raise DataPrepError(f"data prep config: {problem} (null = one per CPU)")
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    _check_output_dir(output_dir)
    emit = _Emitter(progress, started)
    if not task.leader:
        return _follow(cfg, output_dir, task, emit, started)
    try:
        return _lead(cfg, recipe_dir, output_dir, task, emit, started, cpu_started, job_dir)
    except BaseException as error:
        _announce(output_dir, task, status="failed", error=str(error) or type(error).__name__)
        raise


def _lead(
    cfg: DataPrepConfig,
    recipe_dir,
    output_dir: Path,
    task: PrepTask,
    emit: _Emitter,
    started: float,
    cpu_started: float,
    job_dir: Path | None = None,
) -> DataPrepResult:
    blend_path = _resolve_blend_path(cfg, Path(recipe_dir) if recipe_dir is not None else None)
    blend = load_blend(blend_path)
    base_dir = Path(recipe_dir) if recipe_dir is not None else blend_path.parent

    emit("plan", message=f"planning {len(blend)} datasets")
    plans = _plan_datasets(cfg, blend, base_dir)
    _check_output_apart(output_dir, blend, blend_path, base_dir, plans, job_dir)
    resolved = resolve_tokenizer(cfg.tokenizer)
    tokenizer = Tokenizer(resolved)
    fingerprint = _fingerprint(cfg, plans, tokenizer.identity())
    # Up to here nothing was written; from here on, this prep is the only one in output_dir.
    with _output_lock(output_dir, fingerprint, blend_path) as lock_warnings:
        for warning in lock_warnings:
            emit(warning=warning)
        result = _build(
            cfg,
            output_dir,
            task,
            emit,
            started,
            cpu_started,
            blend,
            blend_path,
            plans,
            resolved,
            tokenizer,
            fingerprint,
        )
        result.warnings[:0] = lock_warnings
        return result


LOCK_NAME = "lock"


@contextlib.contextmanager
def _output_lock(output_dir: Path, fingerprint: str, blend_path: Path) -> Iterator[list[str]]:
    """Held by task 0 from its first write under ``output_dir`` to its end, so that a prep
    never deletes or replaces the work of another that is still running (any
    config: another config's build would delete this one's work directory at its start and
    the whole ``.work/`` at its end; the same config's would tokenize every unit again and
    swap the same build in twice, moving the first one's complete output aside and deleting
    it). Another prep holding it ends this one before it writes anything, with one error
    naming both. A dead prep holds nothing (the kernel releases the lock of a process however
    it ends), so its work directory is still reused or cleaned by the next.

    An flock rather than the writer-named temporaries of `remove_stale_temporaries`: a prep
    on another host (a Slurm task 0 on a compute node) can never be proved dead by its name,
    so its leftovers could never be cleaned; an flock is released there too. The lock file
    lives in ``.work/``, removed last with it. Yields the warnings to give (a file system
    without locks: the prep goes on, unguarded)."""
    holder = json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "blend": str(blend_path),
            "fingerprint": fingerprint,
        }
    )
    work_root = output_dir / WORK_DIR
    with contextlib.ExitStack() as stack:
        try:
            locked = stack.enter_context(exclusive_lock(work_root / LOCK_NAME, holder))
        except LockBusy as busy:
            raise DataPrepError(_busy_message(output_dir, busy, fingerprint)) from None
        except OSError as error:
            raise DataPrepError(
                f"output_dir {output_dir}: cannot lock {error.filename}: {error.strerror}"
            ) from None
        warnings: list[str] = []
        if not locked:
            warnings.append(
                f"{work_root / LOCK_NAME}: this file system cannot lock files, so another "
                f"data prep into {output_dir} at the same time would not be noticed; run one at a time"
            )
        try:
            yield warnings
        finally:
            # Still locked: .work/ with nothing but the lock file (a prep done, up to date, or
            # failed before it wrote any work) goes. One kept for a resume keeps its lock file.
            with contextlib.suppress(OSError):
                if os.listdir(work_root) == [LOCK_NAME]:
                    (work_root / LOCK_NAME).unlink()
                    work_root.rmdir()  # (not empty: another prep's new lock file; it keeps it)


def _busy_message(output_dir: Path, busy: LockBusy, fingerprint: str) -> str:
    try:
        other = json.loads(busy.holder)
        who = f"pid {other['pid']} on {other['host']}, started {other['started']}, blend {other['blend']}"
        same = other["fingerprint"] == fingerprint
    except (ValueError, TypeError, KeyError):
        who, same = f"which has not said who it is yet ({busy.path})", False
    if same:
        then = "wait for it to finish (a rerun then finds the output up to date)"
    else:
        then = "wait for it to finish or stop it, or give this prep another output_dir"
    what = "the same build" if same else "another build"
    return f"output_dir {output_dir} is in use by another data prep ({what}; {who}): {then}"


def _clear_work_root(work_root: Path) -> None:
    """Delete what ``.work/`` holds but the lock file (which `_output_lock` removes last, with
    the directory, as it ends: until then another prep is refused, so it never starts work in a
    directory being deleted)."""
    for child in work_root.iterdir() if work_root.is_dir() else []:
        if child.name == LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _build(
    cfg: DataPrepConfig,
    output_dir: Path,
    task: PrepTask,
    emit: _Emitter,
    started: float,
    cpu_started: float,
    blend: Blend,
    blend_path: Path,
    plans: list[_DatasetPlan],
    resolved: ResolvedTokenizer,
    tokenizer: Tokenizer,
    fingerprint: str,
) -> DataPrepResult:
    """`_lead` once it holds the output lock: finish a dead prep's swap, return the cached
    output or build and swap in a new one."""
    _finish_pending_swaps(output_dir)
    work_root = output_dir / WORK_DIR

    if not cfg.force:
        cached = _cached_result(output_dir, fingerprint)
        if cached is not None:
            _announce(output_dir, task, status="cached")
            if task.world == 1:
                _clear_work_root(work_root)  # left by a kill after the last write
            emit("done", message="output is up to date; nothing to do")
            return cached
    _refuse_sample_over_full_build(cfg, output_dir)
    _refuse_foreign_output(cfg, output_dir)

    # The new build is made beside the current output (under .work/<fingerprint>/) and swapped
    # in only when complete: a failure leaves the current output as it was.
    work_dir = work_root / fingerprint[:16]
    current = work_root / "CURRENT"
    previous = current.read_text().strip() if current.is_file() else None
    if cfg.force or previous != fingerprint:
        # Another (or a forced) build: units of an older unfinished build are not reused (its
        # prep is dead: a live one would hold the output lock).
        for child in work_root.iterdir() if work_root.is_dir() else []:
            if child.is_dir() and child.name != "attempts":
                shutil.rmtree(child, ignore_errors=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(current, fingerprint + "\n")
    # Partial unit and shard files of killed processes of this build (a rerun writes its own):
    # only those of writers provably gone; another task's, live or on another host, are left.
    work_dirs = (work_root, work_root / "attempts", work_dir, work_dir / "units")
    for directory in (*work_dirs, *(work_dir / "staging" / split for split in SPLITS)):
        remove_stale_temporaries(directory)

    workers_here = cfg.num_workers or available_cpus()
    plan_file = work_dir / "plan.json"
    if plan_file.is_file():
        # Resume: the units of the first attempt, whatever the number of tasks and workers now.
        units = _load_units(plan_file, work_dir / "units")
    else:
        total_bytes = sum(max(0, piece.size) for plan in plans for piece in plan.source.pieces)
        unit_bytes = unit_bytes_for(total_bytes, workers_here * task.world, cfg.work_unit_mb)
        if cfg.sample is None and total_bytes // unit_bytes > MAX_UNITS:  # (at least that many)
            raise DataPrepError(
                f"data prep config: work_unit_mb {cfg.work_unit_mb:g} cuts the {total_bytes:,} bytes "
                f"of input into at least {total_bytes // unit_bytes:,} work units, more than "
                f"{MAX_UNITS:,}: give a larger work_unit_mb (the default 64 suits any input)"
            )
        units = _units(plans, cfg.sample, work_dir / "units", unit_bytes)
        _save_units(plan_file, units)
    _announce(
        output_dir,
        task,
        status="run",
        fingerprint=fingerprint,
        work_dir=str(work_dir),
        tokenizer_revision=resolved.revision,
        tokenizer_identity=tokenizer.identity(),
    )

    completed = {u.unit_id for u in units if u.marker.is_file()}
    pending = len(units) - len(completed)
    workers = min(workers_here, max(1, pending))
    warnings = _idle_core_warnings(cfg, task, workers_here, len(units), pending)
    for warning in warnings:
        emit(warning=warning)
    emit.state.units_total = len(units)
    emit.state.units_done = len(completed)
    where = f"{task.world} tasks x " if task.world > 1 else ""
    emit(
        "tokenize", message=f"{pending} of {len(units)} work units to tokenize with {where}{workers} workers"
    )
    board = _TaskBoard(work_dir, task, workers)
    worker_cpu, done_here = _run_units(
        units,
        tokenizer,
        workers,
        board.counting(emit),
        _claimer(work_dir, task),
        _progress_ticker(units, board, emit),
    )
    board.record("done", force=True)
    if task.world > 1:
        _wait_for_units(units, board, emit)

    # Per-source accounting and the bad-record policy.
    emit("assemble", message="checking sources and writing shards")
    stats_by_dataset: dict[str, list[dict]] = {plan.entry.name: [] for plan in plans}
    for unit in units:
        stats_by_dataset[unit.dataset].append(json.loads(unit.marker.read_text()))
    source_reports = [_source_checks(cfg, plan, stats_by_dataset[plan.entry.name]) for plan in plans]

    # Shards per dataset and split, written into the staging directory.
    staging = work_dir / "staging"
    split_shards: dict[str, list[_ShardPlan]] = {split: [] for split in SPLITS}
    counts = {"train": cfg.num_shards, "valid": cfg.valid_shards, "test": cfg.test_shards}
    for plan in plans:
        dataset_units = [u for u in units if u.dataset == plan.entry.name]
        segments = {split: _split_segments(dataset_units, split) for split in SPLITS}
        _ensure_coverage(segments, {"valid": plan.valid_fraction, "test": plan.test_fraction})
        for split in SPLITS:
            split_shards[split].extend(
                _cut_into_shards(plan.entry.name, split, segments[split], counts[split], output_dir, staging)
            )
    if not split_shards["train"]:
        raise DataPrepError("no training documents were produced")
    _write_shards([shard for split in SPLITS for shard in split_shards[split]], tokenizer.dtype)

    weights = blend.normalised_weights
    weighted = {
        split: shard_weights(
            weights, [ShardWeight(s.dataset, str(s.prefix), s.tokens) for s in split_shards[split]]
        )
        for split in SPLITS
    }
    write_split_blend(staging / "blend.json", weighted)

    summary = []
    for split in SPLITS:
        for plan in plans:
            name = plan.entry.name
            shards = [s for s in split_shards[split] if s.dataset == name]
            share = sum(w.weight for w in weighted[split] if w.dataset == name)
            summary.append(
                DatasetSplitSummary(
                    dataset=name,
                    split=split,
                    documents=sum(s.documents for s in shards),
                    tokens=sum(s.tokens for s in shards),
                    share=share,
                    files=len(shards),
                )
            )
    elapsed = time.monotonic() - started
    cpu_seconds = time.process_time() - cpu_started + worker_cpu
    sources_meta = []
    for plan, report in zip(plans, source_reports):
        sources_meta.append(
            {
                **report,
                "path": plan.entry.path,
                "subset": plan.entry.subset,
                "weight": plan.entry.weight,
                "normalised_weight": weights[plan.entry.name],
                "revision": plan.source.description.get("revision"),
                "source": plan.source.description,
                "text_field": plan.text_field,
                "work_units": sum(1 for u in units if u.dataset == plan.entry.name),
            }
        )
    tasks: list[dict[str, Any]] = (
        board.read()
        if task.world > 1
        else [{"rank": 0, "host": task.host, "workers": workers, "units": done_here}]
    )
    metadata = {
        "type": ARTIFACT_TYPE,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "producer": {
            "name": "nemotron",
            "version": __version__,
            "python": platform.python_version(),
            "host": socket.gethostname(),
            "workers": sum(int(t.get("workers", 0)) for t in tasks),
            "tasks": [{k: t.get(k) for k in ("rank", "host", "workers", "units")} for t in tasks],
        },
        "blend_definition": str(blend_path),
        "config": asdict(cfg),
        "tokenizer": tokenizer.describe(),
        "dtype": tokenizer.dtype.name,
        "sources": sources_meta,
        "counts": {
            split: {
                "documents": sum(s.documents for s in split_shards[split]),
                "tokens": sum(s.tokens for s in split_shards[split]),
                "files": len(split_shards[split]),
            }
            for split in SPLITS
        },
        "splits": {
            split: [
                {
                    "dataset": w.dataset,
                    "prefix": w.prefix,
                    "tokens": w.tokens,
                    "weight": w.weight,
                    "documents": s.documents,
                    # Training and a rerun know the shard again by this (`shard_seal`).
                    "seal": shard_seal(s.staged),
                }
                for w, s in zip(weighted[split], [s for s in split_shards[split] if s.tokens > 0])
            ]
            for split in SPLITS
        },
        "summary": [asdict(row) for row in summary],
        "elapsed_s": elapsed,
        "cpu_s": cpu_seconds,
    }
    atomic_write_text(staging / "metadata.json", json.dumps(metadata, indent=2, default=str) + "\n")
    _swap_in(output_dir, work_dir)
    _announce(output_dir, task, status="done")  # the other tasks wait for this to exit
    _clear_work_root(work_root)
    emit("done", message="data prep complete")
    result = _result_from_metadata(output_dir, metadata, cached=False, elapsed=elapsed, reused=len(completed))
    result.cpu_s = cpu_seconds
    result.warnings = warnings
    result.units_done_here = done_here
    return result


def _progress_ticker(units: list[UnitSpec], board: _TaskBoard, emit: _Emitter) -> Callable[[], None]:
    """Called while units run: this task's status file, and (several tasks) the units done by
    every task, from the completion markers and the other tasks' status files."""
    last = [0.0]
    markers = {unit.marker.name for unit in units}
    directory = Path(units[0].out_dir) if units else None

    def tick() -> None:
        board.record()
        now = time.monotonic()
        if board.task.world == 1 or now - last[0] < 1.0 or directory is None:
            return
        last[0] = now
        done = len(markers.intersection(os.listdir(directory))) if directory.is_dir() else 0
        emit.state.units_done = done
        emit.state.tasks = {f"task {row['rank']} ({row['host']})": int(row["units"]) for row in board.read()}
        emit()

    return tick


def _wait_for_units(units: list[UnitSpec], board: _TaskBoard, emit: _Emitter) -> None:
    """Task 0: wait until every unit is complete and every other task has written its final
    status (so the counts task 0 records are final, and no task is still starting or writing
    into the work directory when task 0 assembles and removes it); a failed task's error ends
    the wait."""
    directory = Path(units[0].out_dir)
    markers = {unit.marker.name for unit in units}
    others = set(range(1, board.task.world))
    reported = ""
    while True:
        done = len(markers.intersection(os.listdir(directory))) if directory.is_dir() else 0
        rows = board.read()
        emit.state.units_done = done
        emit.state.tasks = {f"task {row['rank']} ({row['host']})": int(row["units"]) for row in rows}
        finished = {int(row["rank"]) for row in rows if row.get("state") == "done"}
        if done < len(markers):
            message = f"waiting for {len(markers) - done} work units of the other tasks"
        else:
            message = f"waiting for {len(others - finished)} tasks to report their work units"
        emit(message=message if message != reported else "")
        reported = message
        if done == len(markers) and others <= finished:
            return
        for row in rows:
            if row.get("state") == "failed":
                raise DataPrepError(f"task {row['rank']} on {row['host']} failed: {row.get('error')}")
        time.sleep(POLL_SECONDS)


def _wait_for_leader(attempt: Path) -> None:
    """A task other than 0, its units done: stay until task 0 has assembled the output (srun
    ends a step's remaining tasks soon after its first task exits). Task 0 announces the end,
    then removes the work directory (with this file)."""
    while True:
        try:
            status = json.loads(attempt.read_text()).get("status")
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            status = None  # being replaced
        if status == "done":
            return
        if status == "failed":
            raise DataPrepError(f"task 0 failed: {json.loads(attempt.read_text()).get('error')}")
        time.sleep(POLL_SECONDS)


def _follow(
    cfg: DataPrepConfig, output_dir: Path, task: PrepTask, emit: _Emitter, started: float
) -> DataPrepResult:
    """A task other than 0: wait for task 0's plan, then tokenize the units it can claim."""
    attempt = _attempt_file(output_dir, task)
    emit("plan", message=f"task {task.rank} of {task.world}: waiting for task 0's plan")
    deadline = time.monotonic() + FOLLOWER_WAIT_S
    while True:
        try:
            announced = json.loads(attempt.read_text())
            break
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                raise DataPrepError(
                    f"{attempt}: task 0 announced no plan within {FOLLOWER_WAIT_S:.0f} s"
                ) from None
            time.sleep(POLL_SECONDS)
    status = announced.get("status")
    result = DataPrepResult(
        output_dir=output_dir,
        blend_path=output_dir / "blend.json",
        metadata_path=output_dir / "metadata.json",
        fingerprint=announced.get("fingerprint", ""),
        cached=status == "cached",
        summary=[],
        bad_records={},
        bad_locations={},
        elapsed_s=0.0,
    )
    if status == "failed":
        raise DataPrepError(f"task 0 failed: {announced.get('error')}")
    if status == "cached":
        emit("done", message="output is up to date; nothing to do")
        return result
    work_dir = Path(announced["work_dir"])
    units = _load_units(work_dir / "plan.json", work_dir / "units")
    tokenizer_cfg = dataclasses.replace(
        cfg.tokenizer, revision=announced.get("tokenizer_revision") or cfg.tokenizer.revision
    )
    workers = cfg.num_workers or available_cpus()
    board = _TaskBoard(work_dir, task, workers)
    try:  # task 0 waits for this task's final status: a failure here must reach it too
        tokenizer = Tokenizer(resolve_tokenizer(tokenizer_cfg))
        if tokenizer.identity() != announced.get("tokenizer_identity"):
            raise DataPrepError(
                f"task {task.rank} on {task.host}: tokenizer {cfg.tokenizer.model} differs from "
                f"task 0's (not the same files on every node?)"
            )
        emit.state.units_total = len(units)
        emit(
            "tokenize",
            message=f"task {task.rank} of {task.world} on {task.host}: tokenizing with {workers} workers",
        )
        _, done = _run_units(
            units,
            tokenizer,
            workers,
            board.counting(emit),
            _claimer(work_dir, task),
            _progress_ticker(units, board, emit),
        )
    except BaseException as error:
        board.record("failed", error=str(error) or type(error).__name__, force=True)
        raise
    board.record("done", force=True)
    emit(
        "assemble",
        message=f"task {task.rank}: {done} work units done; waiting for task 0 to assemble the output",
    )
    _wait_for_leader(attempt)
    emit("done", message=f"task {task.rank}: {done} work units done; output assembled by task 0")
    result.units_done_here = done
    result.elapsed_s = time.monotonic() - started
    return result
