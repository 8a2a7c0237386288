"""Data preparation: raw blend -> tokenized Megatron shards, ``blend.json`` and ``metadata.json``.

Pipeline
1. Plan: validate the blend, list every source's pieces (``sources.plan_source``), resolve the
   tokenizer, and compute the fingerprint of sources (paths, revisions, file sizes and mtimes),
   tokenizer identity and prep config. If ``metadata.json`` in the output directory carries
   the same fingerprint and its shards exist, nothing is done (``DataPrepResult.cached``).
2. Tokenize: each *work unit* (a piece of one dataset) is processed by a pool of worker
   processes (every core by default). A worker reads its piece, skips and counts bad records,
   applies the filters, tokenizes in batches, routes each document to train/valid/test by a hash
   of its text, and streams the tokens into per-unit ``.bin/.idx`` files under
   ``<output>/.work/<fingerprint>/``; when the unit is complete it writes a completion marker
   atomically. Memory per worker is one batch, independent of dataset size.
3. Assemble: per dataset and split, the units' documents are concatenated in unit order and
   cut into shards of near-equal tokens (``<split>/<dataset>_<k>.bin/.idx``), each written to
   a temporary name and renamed when complete; then ``blend.json`` (weights as documented in
   ``blend.py``) and finally ``metadata.json``, whose presence marks the output complete.

Resume: a rerun after an interruption (even kill -9) reuses completed units and shards and
redoes the rest. Because the document order and the assignment of documents to shards depend
only on the inputs and the config (never on timing or the number of workers), the result is
byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import platform
import queue
import re
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from nemotron.data import sources as src
from nemotron.data.blend import (
    SPLITS,
    Blend,
    BlendEntry,
    ShardWeight,
    load_blend,
    shard_weights,
    write_split_blend,
)
from nemotron.data.config import DataPrepConfig
from nemotron.data.indexed import IndexedDataset, IndexedDatasetWriter, bin_path, prefix_exists
from nemotron.data.tokenizers import ResolvedTokenizer, Tokenizer, resolve_tokenizer
from nemotron.utils.fs import atomic_write_text

ARTIFACT_TYPE = "DataBlendsArtifact-pretrain"
FORMAT_VERSION = 1
WORK_DIR = ".work"
MAX_LOCATIONS = 5  # bad-record locations reported per source
BATCH_DOCS = 1024
BATCH_CHARS = 1 << 20
COPY_CHUNK_BYTES = 64 << 20
SHARD_NAME = re.compile(r"^.+_\d{5}\.(bin|idx)$")


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
    if not cfg.work_unit_mb > 0:
        fail("work_unit_mb", f"must be > 0, got {cfg.work_unit_mb!r}")


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
                max_doc_tokens=entry.max_doc_tokens if entry.max_doc_tokens is not None else cfg.max_doc_tokens,
            )
        )
    return plans


def _fingerprint(cfg: DataPrepConfig, plans: list[_DatasetPlan], tokenizer_identity: str) -> str:
    payload = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_identity,
        "config": {
            key: getattr(cfg, key)
            for key in (
                "num_shards", "valid_shards", "test_shards", "valid_fraction", "test_fraction",
                "text_field", "min_doc_chars", "max_doc_tokens", "sample", "max_bad_record_fraction",
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


def _units(plans: list[_DatasetPlan], sample: int | None, work_dir: Path) -> list[UnitSpec]:
    units = []
    out_dir = str(work_dir / "units")
    for dataset_index, plan in enumerate(plans):
        # With --sample the first N rows of the dataset are wanted: one unit reads the pieces
        # in order and stops after N rows.
        groups = [tuple(plan.source.pieces)] if sample else [(piece,) for piece in plan.source.pieces]
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
                    out_dir=out_dir,
                )
            )
    return units


# ---------------------------------------------------------------------------------------------
# Tokenization (runs in worker processes)

_WORKER: dict = {}


def _init_worker(resolved: ResolvedTokenizer | Tokenizer, progress_queue, single_threaded: bool = True) -> None:
    if single_threaded:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _WORKER["tokenizer"] = resolved if isinstance(resolved, Tokenizer) else Tokenizer(resolved)
    _WORKER["queue"] = progress_queue


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
    stats = {
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
        records = itertools.chain.from_iterable(src.iter_records(p, spec.text_field) for p in spec.pieces)
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
            stats["chars"] += len(data)
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
    prefix: Path  # final output prefix
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


def _cut_into_shards(dataset: str, split: str, segments: list[_Segment], num_shards: int,
                     output_dir: Path) -> list[_ShardPlan]:
    """Contiguous shards of near-equal tokens: a document goes to shard floor(tokens_before * n / total)."""
    def lengths_of(segment: _Segment) -> np.ndarray:
        return IndexedDataset(segment.prefix).sequence_lengths[segment.start : segment.stop].astype(np.int64)

    # Two passes, one segment's lengths in memory at a time: memory is bounded by the work-unit
    # size, not by the dataset's size.
    total = sum(int(lengths_of(segment).sum()) for segment in segments)
    if total == 0:
        return []
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
            plan.segments.append(_Segment(segment.prefix, segment.start + run_start, segment.start + run_stop))
            plan.documents += run_stop - run_start
            plan.tokens += int(lengths[run_start:run_stop].sum())
    ordered = [shards[k] for k in sorted(shards)]
    for number, plan in enumerate(ordered):  # empty shards are dropped; numbering stays dense
        plan.prefix = output_dir / split / f"{dataset}_{number:05d}"
    return ordered


def _write_shard(plan: _ShardPlan, dtype) -> None:
    if prefix_exists(plan.prefix):
        return  # written by an interrupted run of the same fingerprint (renamed only when complete)
    with IndexedDatasetWriter(plan.prefix, dtype) as writer:
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


# ---------------------------------------------------------------------------------------------
# Orchestration


def _clear_outputs(output_dir: Path) -> None:
    for name in ("metadata.json", "blend.json"):
        (output_dir / name).unlink(missing_ok=True)
    for split in SPLITS:
        directory = output_dir / split
        if directory.is_dir():
            for path in directory.iterdir():
                if path.is_file() and (SHARD_NAME.match(path.name) or path.name.endswith(".tmp")):
                    path.unlink()


def _cached_result(output_dir: Path, fingerprint: str) -> DataPrepResult | None:
    metadata_path = output_dir / "metadata.json"
    try:
        metadata = json.loads(metadata_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if metadata.get("fingerprint") != fingerprint or not (output_dir / "blend.json").is_file():
        return None
    for shards in metadata.get("splits", {}).values():
        if not all(prefix_exists(shard["prefix"]) for shard in shards):
            return None
    return _result_from_metadata(output_dir, metadata, cached=True, elapsed=0.0, reused=0)


def _result_from_metadata(output_dir: Path, metadata: dict, cached: bool, elapsed: float,
                          reused: int) -> DataPrepResult:
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
    locations = []
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


def _run_units(pending: list[UnitSpec], tokenizer: Tokenizer, workers: int,
               emit: Callable[..., None]) -> float:
    """Process the units; returns the CPU seconds spent in worker processes (0 when inline)."""
    if not pending:
        return 0.0
    if workers == 1:
        # In the calling process: no process start-up cost, and its environment is left alone.
        _init_worker(tokenizer, _DirectReport(emit), single_threaded=False)
        try:
            for unit in pending:
                _process_unit(unit)
                emit(units=1)
        finally:
            _WORKER.clear()
        return 0.0
    context = _worker_context()
    progress_queue = context.Queue()
    with futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_init_worker, initargs=(tokenizer.resolved, progress_queue)
    ) as pool:
        running = {pool.submit(_process_unit, unit) for unit in pending}
        worker_cpu: dict[int, float] = {}
        try:
            while running:
                done, running = futures.wait(running, timeout=0.25, return_when=futures.FIRST_COMPLETED)
                _drain(progress_queue, emit)
                for future in done:
                    stats = future.result()  # re-raises a worker's error here
                    worker_cpu[stats["pid"]] = max(worker_cpu.get(stats["pid"], 0.0), stats["process_cpu_s"])
                    emit(units=1)
        except BaseException:
            for future in running:
                future.cancel()
            raise
        finally:
            _drain(progress_queue, emit)
    return sum(worker_cpu.values())


def available_cpus() -> int:
    """CPUs this process may run on (a Slurm or taskset allocation, not the whole machine)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # platforms without sched_getaffinity
        return os.cpu_count() or 1


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


def run_data_prep(
    cfg: DataPrepConfig,
    recipe_dir: Path | str | None = None,
    progress: ProgressCallback | None = None,
) -> DataPrepResult:
    """Prepare the blend described by ``cfg``; see the module docstring for the pipeline."""
    started, cpu_started = time.monotonic(), time.process_time()
    _validate_config(cfg)
    blend_path = _resolve_blend_path(cfg, Path(recipe_dir) if recipe_dir is not None else None)
    blend = load_blend(blend_path)
    base_dir = Path(recipe_dir) if recipe_dir is not None else blend_path.parent
    output_dir = Path(cfg.output_dir).expanduser().resolve()

    state = PrepProgress(phase="plan")

    def emit(phase: str | None = None, units: int = 0, documents: int = 0, tokens: int = 0,
             bytes_read: int = 0, message: str = "") -> None:
        if phase:
            state.phase = phase
        state.units_done += units
        state.documents += documents
        state.tokens += tokens
        state.bytes_read += bytes_read
        state.elapsed_s = time.monotonic() - started
        state.message = message
        if progress is not None:
            progress(dataclasses.replace(state))

    emit("plan", message=f"planning {len(blend)} datasets")
    plans = _plan_datasets(cfg, blend, base_dir)
    resolved = resolve_tokenizer(cfg.tokenizer)
    tokenizer = Tokenizer(resolved)
    fingerprint = _fingerprint(cfg, plans, tokenizer.identity())

    if not cfg.force:
        cached = _cached_result(output_dir, fingerprint)
        if cached is not None:
            shutil.rmtree(output_dir / WORK_DIR, ignore_errors=True)  # left by a kill after the last write
            emit("done", message="output is up to date; nothing to do")
            return cached

    work_root = output_dir / WORK_DIR
    work_dir = work_root / fingerprint[:16]
    current = work_root / "CURRENT"
    previous = current.read_text().strip() if current.is_file() else None
    if cfg.force or previous != fingerprint:
        # A different (or forced) build: nothing of an older output may survive to look valid.
        _clear_outputs(output_dir)
        if work_root.is_dir():
            for child in work_root.iterdir():
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
    else:
        (output_dir / "metadata.json").unlink(missing_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(current, fingerprint + "\n")

    units = _units(plans, cfg.sample, work_dir)
    completed = {u.unit_id for u in units if u.marker.is_file()}
    pending = [u for u in units if u.unit_id not in completed]
    workers = min(cfg.num_workers or available_cpus(), max(1, len(pending)))
    state.units_total = len(units)
    state.units_done = len(completed)
    emit("tokenize", message=f"{len(pending)} of {len(units)} work units to tokenize with {workers} workers")
    worker_cpu = _run_units(pending, tokenizer, workers, emit)

    # Per-source accounting and the bad-record policy.
    emit("assemble", message="checking sources and writing shards")
    stats_by_dataset: dict[str, list[dict]] = {plan.entry.name: [] for plan in plans}
    for unit in units:
        stats_by_dataset[unit.dataset].append(json.loads(unit.marker.read_text()))
    source_reports = [_source_checks(cfg, plan, stats_by_dataset[plan.entry.name]) for plan in plans]

    # Shards per dataset and split.
    split_shards: dict[str, list[_ShardPlan]] = {split: [] for split in SPLITS}
    counts = {"train": cfg.num_shards, "valid": cfg.valid_shards, "test": cfg.test_shards}
    for plan in plans:
        dataset_units = [u for u in units if u.dataset == plan.entry.name]
        segments = {split: _split_segments(dataset_units, split) for split in SPLITS}
        _ensure_coverage(segments, {"valid": plan.valid_fraction, "test": plan.test_fraction})
        for split in SPLITS:
            split_shards[split].extend(
                _cut_into_shards(plan.entry.name, split, segments[split], counts[split], output_dir)
            )
    if not split_shards["train"]:
        raise DataPrepError("no training documents were produced")
    for split in SPLITS:
        for shard in split_shards[split]:
            _write_shard(shard, tokenizer.dtype)

    weights = blend.normalised_weights
    weighted = {
        split: shard_weights(
            weights, [ShardWeight(s.dataset, str(s.prefix), s.tokens) for s in split_shards[split]]
        )
        for split in SPLITS
    }
    write_split_blend(output_dir / "blend.json", weighted)

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
    from nemotron import __version__

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
            "workers": workers,
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
                {"dataset": w.dataset, "prefix": w.prefix, "tokens": w.tokens, "weight": w.weight,
                 "documents": s.documents}
                for w, s in zip(weighted[split], [s for s in split_shards[split] if s.tokens > 0])
            ]
            for split in SPLITS
        },
        "summary": [asdict(row) for row in summary],
        "elapsed_s": elapsed,
        "cpu_s": cpu_seconds,
    }
    atomic_write_text(output_dir / "metadata.json", json.dumps(metadata, indent=2, default=str) + "\n")
    shutil.rmtree(work_root, ignore_errors=True)
    emit("done", message="data prep complete")
    result = _result_from_metadata(output_dir, metadata, cached=False, elapsed=elapsed, reused=len(completed))
    result.cpu_s = cpu_seconds
    return result
