"""GPT training samples with Megatron-Core 0.16's semantics, read from indexed bin/idx datasets.

What a Megatron user expects (docs/reference.md §4), for one dataset (one bin/idx prefix) asked
for N samples of seq_length tokens; the arrays match Megatron-Core 0.16.1's `GPTDataset`
element for element (tests/data/test_megatron_order.py compares them with indices Megatron-Core
itself built):

- the number of epochs E is the smallest with E * tokens >= N * seq_length + 1;
- the separate final epoch: when E > 1 and the last epoch contributes fewer than
  int(0.8 * samples per epoch) of the N samples, the last epoch is shuffled on its own (its
  documents after the first E - 1 epochs' documents, its samples after theirs), so a dataset
  read 1.1 times does not spread the 0.1 over the whole run;
- the document order: E (or E - 1, then 1) copies of the document ids, shuffled with
  `numpy.random.RandomState(seed)`;
- sample j is the seq_length + 1 consecutive tokens starting at token j * seq_length of the
  stream of shuffled documents (neighbouring samples share one token): tokens = t[:-1],
  labels = t[1:]; (E * tokens - 1) // seq_length samples are built, at least N;
- the order in which samples are served is a permutation of them drawn next from the same
  RandomState (with a separate final epoch: its samples permuted apart, after the others).

The three index arrays are built once (by rank 0 when torch.distributed is initialised) and
cached as .npy files under a key hashing everything that shapes them; every rank memory-maps
them. Blending of several datasets lives in `blended.py`; `build_split_dataset` is the entry
point that reads a `blend.json` and returns the dataset of one split.

A blend file is either per-split (`{"train": ..., "valid": ..., "test": ...}`, Megatron's
`--per-split-data-args-path`) or one blend for every split (a list or string of weights and
prefixes, Megatron's `--data-path`), cut by a split string such as "99,1,0" (Megatron's
`--split`, default "969, 30, 1"): the numbers are normalised to fractions f_train, f_valid,
f_test, and split k of each prefix is its documents [round(b_k * D), round(e_k * D)), D its
document count, b_k and e_k the cumulative fractions before and after k (Python's round, half
to even; a zero fraction: no such split). Each split then reads its own documents only, with
the rules above (its own epochs, same seed), and blends as a per-split blend does, except
that one weighted prefix is a blend of one dataset (asked ceil(ceil(N) * 1.005), as Megatron).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemotron.data.indexed import IndexedDataset, IndexedDatasetError
from nemotron.data.mapped import PicklesByReference
from nemotron.utils.fs import atomic_path, atomic_write_text, read_json, remove_stale_temporaries

# 2: Megatron-Core 0.16's separate final epoch and blend sizes (version 1 caches are not reused).
INDEX_FORMAT_VERSION = 2
SPLITS = ("train", "valid", "test")
# Megatron's `--split` when `--data-path` (one blend for every split) comes without one.
DEFAULT_SPLIT = "969, 30, 1"
_SPLIT_NUMBER = re.compile(r"[.0-9]+")  # what Megatron's `parse_and_normalize_split` reads


class GPTDatasetError(ValueError):
    """A blend file, split or dataset that cannot produce the requested samples."""


class IndexTooLargeError(GPTDatasetError):
    """Indices that would need more memory than this machine has (`check_index_memory`)."""


def physical_memory() -> int | None:
    """Bytes of memory this machine has (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def check_index_memory(what: str, nbytes: int) -> None:
    """Refuse, before anything is allocated, indices whose arrays alone take more bytes than
    this machine's memory: a sample count absurd for the data (a hand-edited consumed count, a
    train_iters meant for another blend) would otherwise end in a MemoryError, or, where memory
    is overcommitted, in the kernel killing the process hours into the build. `nbytes` is a
    lower bound (the arrays kept, not the build's temporaries), so no build that could fit is
    refused; the real recipe's blend (about 3e9 samples: some 30 GB) fits a training node."""
    limit = physical_memory()
    if limit is not None and nbytes > limit:
        raise IndexTooLargeError(
            f"{what}: its index arrays would take at least {nbytes / 2**30:,.1f} GiB, more than "
            f"the {limit / 2**30:,.1f} GiB of memory this machine has"
        )


# ---------------------------------------------------------------------------------------------
# Index rules (pure functions; tests compare them with a direct implementation)


def num_epochs_needed(tokens_per_epoch: int, num_samples: int, seq_length: int) -> int:
    """Smallest E with E * tokens_per_epoch >= num_samples * seq_length + 1."""
    if tokens_per_epoch <= 0:
        raise GPTDatasetError("the dataset has no tokens")
    requested = num_samples * seq_length + 1
    return max(1, -(-requested // tokens_per_epoch))


# Megatron keeps the last epoch apart when it contributes fewer than this share of an epoch.
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


def separate_final_epoch(
    tokens_per_epoch: int, num_samples: int, seq_length: int, num_epochs: int
) -> tuple[bool, int]:
    """(whether the last epoch is shuffled apart, samples built before the last epoch).

    With E epochs, (E - 1) epochs hold S_pre = ((E - 1) * tokens - 1) // seq_length samples;
    the last epoch is separate when N - S_pre < int(0.8 * ((tokens - 1) // seq_length)).
    """
    if num_epochs == 1:
        return False, 0
    before_last = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    per_epoch = (tokens_per_epoch - 1) // seq_length
    from_last = num_samples - before_last
    return from_last < int(SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch), before_last


def build_document_index(
    document_ids: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_last: bool = False
) -> np.ndarray:
    """E copies of the document ids shuffled together (consuming `rng`), or with
    `separate_last`: E - 1 copies shuffled, then one copy shuffled, concatenated."""
    ids = np.asarray(document_ids, dtype=np.int64)
    if separate_last and num_epochs > 1:
        first = build_document_index(ids, num_epochs - 1, rng)
        return np.concatenate([first, build_document_index(ids, 1, rng)])
    document_index = np.tile(ids, num_epochs)
    rng.shuffle(document_index)
    return document_index


def build_sample_index(
    sequence_lengths: np.ndarray, document_index: np.ndarray, seq_length: int
) -> np.ndarray:
    """[N + 1, 2] int64: row j = (position in document_index, token offset) where sample j starts.

    Sample j covers the stream tokens j*seq_length .. (j+1)*seq_length inclusive, so row j + 1
    is also where sample j's last token (the extra label token) sits. A start on a document
    boundary belongs to the next non-empty document, except row 0, which is always (0, 0)
    (Megatron's builder starts there even when the first document is empty).
    """
    lengths = np.asarray(sequence_lengths, dtype=np.int64)[document_index]
    ends = np.cumsum(lengths)
    total_tokens = int(ends[-1]) if len(ends) else 0
    num_samples = (total_tokens - 1) // seq_length
    if num_samples <= 0:
        raise GPTDatasetError(f"{total_tokens} tokens cannot make one sample of seq_length {seq_length} + 1")
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    starts = np.concatenate([[0], ends[:-1]])
    doc_pos = np.searchsorted(ends, positions, side="right")
    sample_index = np.empty((num_samples + 1, 2), dtype=np.int64)
    sample_index[:, 0] = doc_pos
    sample_index[:, 1] = positions - starts[doc_pos]
    sample_index[0] = 0
    return sample_index


def build_shuffle_index(
    num_samples: int, rng: np.random.RandomState, first_part: int | None = None
) -> np.ndarray:
    """A permutation of range(num_samples) from `rng` (Megatron's dtype choice, same draws).

    With `first_part` (a separate final epoch), [0, first_part) and [first_part, num_samples)
    are permuted separately, in that order, and concatenated.
    """
    dtype = np.uint32 if num_samples < np.iinfo(np.uint32).max - 1 else np.int64
    split = num_samples if first_part is None else first_part
    first = np.arange(split, dtype=dtype)
    rng.shuffle(first)
    if split == num_samples:
        return first
    last = np.arange(split, num_samples, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate([first, last])


def parse_split(split: str) -> list[float]:
    """The normalised train/valid/test fractions of a split string such as "99,1,0".

    Megatron's reading (`parse_and_normalize_split`): up to three numbers, missing ones 0,
    divided by their float64 sum. Where Megatron would read something else than the numbers
    written (a minus sign it drops, letters it skips, an empty field it closes up: "98,,2"
    would give valid 2) or divide by zero, an error instead.
    """
    if not isinstance(split, str):
        raise GPTDatasetError(f"split {split!r} must be a string such as '99,1,0'")
    numbers = _SPLIT_NUMBER.findall(split)
    leftover = _SPLIT_NUMBER.sub(" ", split).replace(",", " ").strip()
    if leftover or not numbers:
        raise GPTDatasetError(
            f"split {split!r}: expected up to three numbers >= 0 separated by commas, such as '99,1,0'"
        )
    if len(numbers) > len(SPLITS):
        raise GPTDatasetError(f"split {split!r} has {len(numbers)} numbers: at most 3 (train, valid, test)")
    fields = split.split(",")
    while fields and not fields[-1].strip():
        fields.pop()  # a trailing comma shifts nothing
    if any(not f.strip() for f in fields):
        # Megatron reads the numbers only: "98,,2" would give valid the 2 meant for test.
        raise GPTDatasetError(
            f"split {split!r} has an empty field: Megatron would move the numbers after it to "
            "the splits before; write every share up to the last, e.g. '98,0,2'"
        )
    try:
        values = [float(n) for n in numbers]
    except ValueError:
        raise GPTDatasetError(f"split {split!r}: {numbers} are not all numbers") from None
    values += [0.0] * (len(SPLITS) - len(values))
    total = np.sum(np.asarray(values, dtype=np.float64))
    if not (math.isfinite(total) and total > 0):
        raise GPTDatasetError(f"split {split!r}: the numbers must sum to a finite value > 0")
    return (np.asarray(values, dtype=np.float64) / total).tolist()


def split_bounds(split: str) -> list[tuple[float, float] | None]:
    """(begin, end) fraction of each split, None for a split with no share: the cumulative
    sums in Megatron's order (`convert_split_vector_to_split_matrix`), so the float bounds
    and hence the rounded document ranges are Megatron's exactly."""
    fractions = parse_split(split)
    edges = [0.0]
    for f in fractions:
        edges.append(edges[-1] + f)
    return [(b, e) if e > b else None for b, e in zip(edges[:-1], edges[1:])]


def split_documents(num_documents: int, bounds: tuple[float, float]) -> tuple[int, int]:
    """Documents [begin, end) of a split of a prefix holding `num_documents` (Megatron's
    `int(round(fraction * float(num_documents)))` at each end)."""
    begin, end = bounds
    return int(round(begin * float(num_documents))), int(round(end * float(num_documents)))


# ---------------------------------------------------------------------------------------------
# Cache helpers


def _is_rank_zero() -> bool:
    return not _distributed() or torch.distributed.get_rank() == 0


# How long the other ranks wait for rank 0 to build an index cache entry. Not the process
# group's timeout (NCCL's default is 10 minutes): a cold cache at the recipe's scale takes
# minutes with the compiled blend index and about 1.5 hours without a C++ compiler (the Python
# loop, `blended.build_blending_indices`), plus the datasets' own shuffles. A rank 0 that fails
# tells the others at once (`_share_outcome`), one that dies closes its connections (the
# others fail then, and torchrun stops the job), so only a rank 0 stuck (a hung filesystem)
# makes them wait this long.
INDEX_BUILD_TIMEOUT = timedelta(hours=3)

# (the default process group it was made for, a gloo group of all ranks whose collectives wait
# INDEX_BUILD_TIMEOUT): made once per process group, by every rank at its first cache entry.
_index_group: tuple[Any, Any] | None = None


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _wait_group() -> Any:
    global _index_group
    world = torch.distributed.group.WORLD
    if _index_group is None or _index_group[0] is not world:
        _index_group = (world, torch.distributed.new_group(backend="gloo", timeout=INDEX_BUILD_TIMEOUT))
    return _index_group[1]


def _share_outcome(marker: Path, failure: str | None) -> None:
    """Every rank waits here (up to INDEX_BUILD_TIMEOUT) for rank 0 to finish with cache entry
    `marker`; rank 0 passes `failure` (None: built or already there; else its error), which
    the other ranks raise as theirs, naming rank 0's error instead of a collective's timeout."""
    if not _distributed():
        return
    outcome = [failure]
    try:
        torch.distributed.broadcast_object_list(outcome, src=0, group=_wait_group())
    except RuntimeError as exc:  # a timeout, or rank 0 gone (its connections closed)
        if _is_rank_zero():
            raise
        cause = (str(exc).strip().splitlines() or [repr(exc)])[0]
        raise GPTDatasetError(
            f"rank 0 did not finish building index cache entry {marker} (it stopped, or took "
            f"longer than {INDEX_BUILD_TIMEOUT}): {cause}"
        ) from exc
    if outcome[0] is not None and not _is_rank_zero():
        raise GPTDatasetError(f"rank 0 failed to build index cache entry {marker}: {outcome[0]}")


def cache_key(description: dict[str, Any]) -> str:
    text = json.dumps(description, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_marker(cache_dir: Path, description: dict[str, Any]) -> Path:
    """The file whose presence marks a complete index cache entry (`cached_arrays`)."""
    return Path(cache_dir) / f"{cache_key(description)}-description.json"


def damaged_cache(marker: Path, what: str) -> GPTDatasetError:
    """The error for an index cache entry whose arrays point outside the data: damaged after it
    was written (the arrays are not checksummed; reading them whole at every start would cost
    minutes for a large run), found when a sample is read."""
    return GPTDatasetError(
        f"index cache entry {marker} is damaged: {what}; delete it and the .npy files beside it "
        f"with the same key to have them built again"
    )


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def cached_arrays(
    cache_dir: Path,
    description: dict[str, Any],
    names: tuple[str, ...],
    build,
    shapes_fit: Callable[[dict[str, np.ndarray]], bool] = lambda arrays: True,
) -> dict[str, np.ndarray]:
    """Load arrays `names` cached under the hash of `description`, building them (rank 0) if absent.

    The description JSON is written last, so its presence marks a complete cache entry.
    `shapes_fit`: whether loaded arrays have the shapes the description implies; an entry whose
    arrays do not (a valid .npy of another length written over one) is built again.
    """
    cache_dir = Path(cache_dir)
    key = cache_key(description)
    paths = {name: cache_dir / f"{key}-{name}.npy" for name in names}
    marker = cache_marker(cache_dir, description)
    if _distributed():
        # Made now, while every rank is here, so that making it never waits on rank 0's build.
        _wait_group()
    # An entry whose marker is there but an array is missing or unreadable (a file deleted or
    # truncated by hand, a disk that filled after the entry was complete) is built again, as a
    # cold cache would: the arrays are a pure function of the description, so the run reads the
    # same samples instead of failing at every start until someone finds the damaged file.
    if _is_rank_zero() and not (marker.exists() and _load_arrays(paths, shapes_fit) is not None):
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            # Arrays of entries whose writer was killed mid-save (GBs for a large run); only those
            # of writers provably gone: another run's rank 0 may be saving into a shared cache now.
            remove_stale_temporaries(cache_dir)
            arrays = build()
            for name in names:
                _save_npy_atomic(paths[name], arrays[name])
            atomic_write_text(marker, json.dumps(description, indent=2, sort_keys=True))
        except BaseException as exc:
            with contextlib.suppress(Exception):  # rank 0's own error is the one to raise
                _share_outcome(marker, f"{type(exc).__name__}: {exc}")
            raise
    # The other ranks wait for rank 0 here, however long the build takes (not at a barrier of
    # the process group, whose timeout is for collectives that take seconds).
    _share_outcome(marker, None)
    if not marker.exists():
        raise GPTDatasetError(
            f"index cache {marker} is missing after rank 0 built it: is {cache_dir} on a "
            "filesystem every rank shares?"
        )
    arrays = _load_arrays(paths, shapes_fit)
    if arrays is None:
        raise GPTDatasetError(
            f"index cache entry {marker}: an array beside it is missing, unreadable or of another shape after "
            f"rank 0 checked it: is {cache_dir} on a filesystem every rank shares?"
        )
    return arrays


def _load_arrays(
    paths: dict[str, Path], shapes_fit: Callable[[dict[str, np.ndarray]], bool]
) -> dict[str, np.ndarray] | None:
    """The memory-mapped arrays of a cache entry, or None if one is missing, unreadable, not of
    integers or not of the shapes its description implies."""
    try:
        arrays = {name: np.load(path, mmap_mode="r") for name, path in paths.items()}
    except (OSError, ValueError, EOFError):  # absent, empty, a truncated header or data, not an .npy file
        return None
    if not all(np.issubdtype(a.dtype, np.integer) for a in arrays.values()) or not shapes_fit(arrays):
        return None
    return arrays


# ---------------------------------------------------------------------------------------------
# One dataset


def open_indexed(prefix: str, vocab_size: int | None = None):
    """The indexed dataset of `prefix`, validated at open; with `vocab_size`, every sequence
    read is checked to hold ids inside the vocabulary (error naming the file otherwise).

    Token files hold integers: the indexed format also has float codes (6, 7), whose values
    would be truncated to token ids without a word (and pass the vocabulary check)."""
    dataset = IndexedDataset(prefix, vocab_size=vocab_size)
    if not np.issubdtype(dataset.dtype, np.integer):
        raise IndexedDatasetError(
            f"{dataset.prefix}.idx: dtype {dataset.dtype} is not a token dtype (token files hold integers)"
        )
    return dataset


def sample_dict(tokens: np.ndarray) -> dict[str, torch.Tensor]:
    t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    return {"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(len(t) - 1)}


class GPTDataset(PicklesByReference, torch.utils.data.Dataset):
    """Megatron GPT samples of one indexed dataset (every sequence of it is one document)."""

    def __init__(
        self,
        prefix: str,
        num_samples: int | None,
        seq_length: int,
        seed: int,
        cache_dir: str | Path,
        split: str = "train",
        vocab_size: int | None = None,
        documents: tuple[int, int] | None = None,
        split_string: str | None = None,
    ) -> None:
        """`num_samples` None: one epoch, every sample it holds (Megatron's mid-level dataset
        of a blend without weights). `documents`: read only documents [begin, end) (a split
        of one blend cut by `split_string`, which names it in errors); None: all of them."""
        if (num_samples is not None and num_samples <= 0) or seq_length <= 0:
            raise GPTDatasetError(
                f"num_samples ({num_samples}) and seq_length ({seq_length}) must be positive"
            )
        self.prefix = str(prefix)
        self.indexed = open_indexed(self.prefix, vocab_size)
        self.seq_length = seq_length
        sequence_lengths = np.asarray(self.indexed.sequence_lengths, dtype=np.int64)
        first, stop = (0, len(sequence_lengths)) if documents is None else documents
        if not 0 <= first <= stop <= len(sequence_lengths):
            raise GPTDatasetError(
                f"dataset {self.prefix}: documents [{first}, {stop}) outside its {len(sequence_lengths)}"
            )
        # What an error calls the samples' source: the dataset, or its share of a split.
        source = (
            f"dataset {self.prefix}"
            if documents is None
            else f"the {split!r} split (split {split_string!r}) of dataset {self.prefix}, its "
            f"documents [{first}, {stop}) of {len(sequence_lengths)},"
        )
        if documents is not None and stop == first:
            # Megatron would ask samples of zero tokens (its epoch count never ends) or reject
            # the blend (an assert): a prefix too small for the split string's shares.
            raise GPTDatasetError(
                f"{source} holds no document: give the prefix more documents or the split a "
                "larger share (data.split), or use a per-split blend"
            )
        tokens_per_epoch = int(sequence_lengths[first:stop].sum())
        # A dataset shorter than one sample is read over several epochs, as Megatron does (a
        # sample then spans epochs): e.g. a valid split holding one short document.
        if tokens_per_epoch == 0:
            raise GPTDatasetError(f"{source} has no tokens: it cannot make a sample")
        if num_samples is None:
            if tokens_per_epoch - 1 < seq_length:
                raise GPTDatasetError(
                    f"{source} has {tokens_per_epoch} tokens: read once (a blend "
                    f"without weights) it cannot make one sample of seq_length {seq_length} + 1"
                )
            self.num_epochs = 1
        else:
            self.num_epochs = num_epochs_needed(tokens_per_epoch, num_samples, seq_length)
        bin_path = Path(self.prefix + ".bin")
        self.description = {
            "class": "GPTDataset",
            "format": INDEX_FORMAT_VERSION,
            "prefix": str(Path(self.prefix).resolve()),
            "bin_bytes": bin_path.stat().st_size,
            "num_sequences": len(sequence_lengths),
            "num_tokens": tokens_per_epoch,
            # The indices depend on every document's length, not only on the totals: a
            # rewritten shard with the same sizes but other lengths must not reuse them.
            "lengths_sha256": hashlib.sha256(memoryview(self.indexed.sequence_lengths)).hexdigest(),
            "split": split,
            "num_samples": num_samples,
            "seq_length": seq_length,
            "seed": seed,
        }
        if documents is not None:
            self.description["documents"] = [first, stop]  # absent: every document (older keys)
        self.documents = (first, stop)

        separate, before_last = (
            separate_final_epoch(tokens_per_epoch, num_samples, seq_length, self.num_epochs)
            if num_samples is not None
            else (False, 0)
        )
        self.separate_final_epoch = separate
        if not cache_marker(Path(cache_dir), self.description).exists():  # to be built (rank 0)
            built = (self.num_epochs * tokens_per_epoch - 1) // seq_length
            check_index_memory(
                f"{source} asked for {num_samples if num_samples is not None else 'all its'} "
                f"samples of seq_length {seq_length} "
                f"({self.num_epochs:,} epochs of its {tokens_per_epoch:,} tokens)",
                8 * self.num_epochs * (stop - first)  # document_index
                + 16 * (built + 1)  # sample_index
                + (4 if built < np.iinfo(np.uint32).max - 1 else 8) * built,  # shuffle_index
            )

        def build() -> dict[str, np.ndarray]:
            rng = np.random.RandomState(seed)
            document_index = build_document_index(np.arange(first, stop), self.num_epochs, rng, separate)
            sample_index = build_sample_index(sequence_lengths, document_index, seq_length)
            shuffle_index = build_shuffle_index(len(sample_index) - 1, rng, before_last if separate else None)
            return {
                "document_index": document_index,
                "sample_index": sample_index,
                "shuffle_index": shuffle_index,
            }

        def shapes_fit(arrays: dict[str, np.ndarray]) -> bool:
            document_index, sample_index = arrays["document_index"], arrays["sample_index"]
            shuffle_index = arrays["shuffle_index"]
            return (
                document_index.shape == (self.num_epochs * (stop - first),)
                and sample_index.ndim == 2
                and sample_index.shape[0] >= 1
                and sample_index.shape[1] == 2
                and shuffle_index.shape == (sample_index.shape[0] - 1,)
            )

        arrays = cached_arrays(
            Path(cache_dir),
            self.description,
            ("document_index", "sample_index", "shuffle_index"),
            build,
            shapes_fit,
        )
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]
        self.cache_marker = cache_marker(Path(cache_dir), self.description)

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def sample_length(self, idx: int) -> int:
        """Tokens (= labels) of sample `idx`: every sample of one dataset has seq_length."""
        return self.seq_length

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The seq_length + 1 tokens of served sample `idx` (after the shuffle)."""
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range 0..{len(self) - 1} of {self.prefix}")
        try:
            return self._sample_tokens(idx)
        except IndexError as e:  # idx is in range: an index array points outside the data
            raise damaged_cache(self.cache_marker, f"sample {idx} of {self.prefix}: {e}") from None

    def _sample_tokens(self, idx: int) -> np.ndarray:
        j = int(self.shuffle_index[idx])
        if not 0 <= j < len(self.sample_index) - 1:  # numpy would take a negative j from the end
            raise IndexError(f"shuffle_index[{idx}] = {j} is outside 0..{len(self.sample_index) - 2}")
        doc_beg, off_beg = (int(v) for v in self.sample_index[j])
        doc_end, off_end = (int(v) for v in self.sample_index[j + 1])
        if not 0 <= doc_beg <= doc_end < len(self.document_index):
            raise IndexError(f"sample_index[{j}:{j + 2}] spans documents {doc_beg}..{doc_end}")
        if doc_beg == doc_end:
            return np.asarray(
                self.indexed.get(int(self.document_index[doc_beg]), off_beg, off_end - off_beg + 1)
            )
        parts = [np.asarray(self.indexed.get(int(self.document_index[doc_beg]), off_beg))]
        for k in range(doc_beg + 1, doc_end):
            parts.append(np.asarray(self.indexed.get(int(self.document_index[k]), 0)))
        parts.append(np.asarray(self.indexed.get(int(self.document_index[doc_end]), 0, off_end + 1)))
        return np.concatenate(parts)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return sample_dict(self.sample_tokens(idx))


# ---------------------------------------------------------------------------------------------
# Blend files


def _is_number(value: object) -> bool:
    if isinstance(value, bool):  # JSON true/false: float() would read them as weights 1 and 0
        return False
    try:
        float(value)  # type: ignore[arg-type]
    except OverflowError:  # an integer past a float's range: a number, refused as not finite
        return True
    except (TypeError, ValueError):
        return False
    return True


def _as_weight(value: object) -> float:
    """`value` (a number, `_is_number`) as a float; an integer past a float's range is inf."""
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:
        return math.inf


def load_blend(blend_json_path: str | Path) -> Any:
    """The parsed blend file: a dict (per-split) or a list / string (one blend for every split)."""
    path = Path(blend_json_path)
    blend = read_json(path, GPTDatasetError, "blend file")
    if not isinstance(blend, (dict, list, str)):
        raise GPTDatasetError(
            f'blend file {path}: expected an object of splits ({{"train": [...], ...}}) or one '
            "blend for every split (a list of weight, prefix pairs, cut by data.split)"
        )
    if isinstance(blend, dict):
        # A misspelt split ("vaild") would otherwise be a split the file lacks: skipped with
        # at most a warning, its data never read.
        for key in blend:
            if key not in SPLITS:
                hint = difflib.get_close_matches(str(key), SPLITS, n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise GPTDatasetError(
                    f"blend file {path}: unknown split {key!r}{suggestion}; the splits are {', '.join(SPLITS)}"
                )
    return blend


def is_single_blend(blend: Any) -> bool:
    """Whether a loaded blend file is one blend for every split (Megatron's `--data-path`)."""
    return isinstance(blend, (list, str))


def check_split_string(blend_json_path: str | Path, split_string: str | None) -> bool:
    """Whether the blend file is one blend for every split; a split string with a per-split
    file is an error (Megatron: "split and blend_per_split are incompatible"). The one home of
    that rule: the dataset build and the CLI's check before a job dir is made call it."""
    if is_single_blend(load_blend(blend_json_path)):
        return True
    if split_string is not None:
        raise GPTDatasetError(
            f"blend file {blend_json_path} gives each split its own blend: a split string "
            f"(data.split {split_string!r}) applies to one blend for every split (Megatron's "
            "--data-path with --split); leave data.split unset"
        )
    return False


def read_blend(blend_json_path: str | Path, split: str) -> tuple[list[float] | None, list[str]]:
    """(weights, prefixes) of one split of a blend.json, checked.

    A per-split file gives that split's entry; a file of one blend (a list or string at the
    top, Megatron's `--data-path`) gives that blend for every split (which documents each split
    reads is the split string's business, `build_split_dataset`).
    Megatron's forms (`get_blend_from_list`): a list (or one whitespace-separated string) of
    weight, prefix pairs, or of prefixes alone. A list of odd length is prefixes; one of even
    length is pairs when every even-position entry is a number, prefixes when none is (a mix
    is an error here). Weights are returned as written (the blend normalises them), None for
    prefixes without weights. Relative prefixes resolve against the blend file's directory
    when that exists, else against the working directory (what Megatron does).
    """
    path = Path(blend_json_path)
    if split not in SPLITS:
        raise GPTDatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    blend = load_blend(path)
    if is_single_blend(blend):
        entries, label = blend, "blend"  # errors name entries blend[k]
    elif split not in blend:
        raise GPTDatasetError(f"blend file {path} has no {split!r} split")
    else:
        entries, label = blend[split], split
    if isinstance(entries, str):
        entries = entries.split()  # Megatron's other form: "w1 prefix1 w2 prefix2" or "p1 p2"
    if not isinstance(entries, list) or not entries:
        raise GPTDatasetError(
            f"blend file {path}: {label!r} must be a non-empty list of weight, prefix pairs "
            "(or of prefixes without weights)"
        )
    raw_weights: list[tuple[int, Any]] = []
    raw_prefixes = list(enumerate(entries))
    if len(entries) % 2 == 0:
        numbers = [_is_number(entries[k]) for k in range(0, len(entries), 2)]
        if all(numbers):
            raw_weights = [(k, entries[k]) for k in range(0, len(entries), 2)]
            raw_prefixes = [(k + 1, entries[k + 1]) for k in range(0, len(entries), 2)]
        elif any(numbers):
            k = 2 * numbers.index(False)
            raise GPTDatasetError(
                f"blend file {path}: {label}[{k}] weight {entries[k]!r} is not a number, but "
                f"{label}[{2 * numbers.index(True)}] is a weight: give every prefix a weight, "
                "or none"
            )
    weights: list[float] = []
    for k, raw_weight in raw_weights:
        weight = _as_weight(raw_weight)
        if not math.isfinite(weight) or weight < 0:
            raise GPTDatasetError(
                f"blend file {path}: {label}[{k}] weight {raw_weight!r} is not a finite number >= 0"
            )
        weights.append(weight)
    prefixes = []
    for k, raw_prefix in raw_prefixes:
        prefix = Path(str(raw_prefix).strip())  # Megatron strips each prefix
        if not prefix.is_absolute():
            beside = path.parent / prefix
            prefix = beside if Path(str(beside) + ".idx").exists() else prefix
        for suffix in (".bin", ".idx"):
            file = Path(str(prefix) + suffix)
            if file.exists() and not file.is_file():  # a directory, a FIFO: "not found" misled
                raise GPTDatasetError(
                    f"blend file {path}: {label}[{k}] names {raw_prefix!r} but {file} is not a regular file"
                )
            if not file.exists():
                hint = (
                    " (a list of odd length holds prefixes only, as in Megatron: a weight "
                    "without its prefix?)"
                    if not raw_weights and _is_number(raw_prefix)
                    else ""
                )
                raise GPTDatasetError(
                    f"blend file {path}: {label}[{k}] names {raw_prefix!r} but "
                    f"{prefix}{suffix} does not exist{hint}"
                )
        prefixes.append(str(prefix))
    if not raw_weights:
        return None, prefixes
    if sum(weights) <= 0:
        raise GPTDatasetError(f"blend file {path}: the {label!r} weights sum to zero")
    if not math.isfinite(sum(weights)):
        # Normalised by an infinite sum every weight would be 0: an empty blend.
        raise GPTDatasetError(f"blend file {path}: the {label!r} weights sum to infinity")
    return weights, prefixes


def build_split_dataset(
    blend_json_path: str | Path,
    split: str,
    num_samples: int,
    seq_length: int,
    seed: int,
    cache_dir: str | Path | None = None,
    vocab_size: int | None = None,
    split_string: str | None = None,
) -> torch.utils.data.Dataset:
    """The `num_samples`-sample dataset of one split of a blend.json (Megatron semantics).

    One prefix gives its GPTDataset directly (as Megatron does, except for one weighted prefix
    of a blend cut by a split string, which Megatron blends alone); several are blended
    deterministically (see `blended.py`), by their weights or, without weights, by their sizes
    (each read once). A file of one blend for every split is cut by `split_string` (None:
    Megatron's default "969, 30, 1"), which a per-split file must not have; a split to which
    it gives no share is an error (`split_has_share` tells beforehand). Items are
    {"tokens", "labels", "loss_mask"}.
    """
    # blended.py builds on this module (GPTDataset, the cache): imported here, not at the top
    from nemotron.data.blended import BlendedDataset

    if num_samples <= 0:
        raise GPTDatasetError(f"num_samples must be positive, got {num_samples}")
    weights, prefixes = read_blend(blend_json_path, split)
    cache = Path(cache_dir) if cache_dir is not None else Path(blend_json_path).parent / "cache"
    ranges: list[tuple[int, int] | None] = [None] * len(prefixes)
    if check_split_string(blend_json_path, split_string):
        split_string = DEFAULT_SPLIT if split_string is None else split_string
        try:
            bounds = split_bounds(split_string)[SPLITS.index(split)]
        except GPTDatasetError as exc:
            raise GPTDatasetError(f"blend file {blend_json_path}: {exc}") from None
        if bounds is None:
            raise GPTDatasetError(
                f"blend file {blend_json_path}: split {split_string!r} gives the {split!r} split no share"
            )
        ranges = [split_documents(len(open_indexed(p).sequence_lengths), bounds) for p in prefixes]
    if len(prefixes) == 1 and (weights is None or ranges[0] is None):
        # One prefix: the dataset itself; Megatron blends one weighted prefix of one blend cut
        # by a split string (a blend of one dataset, with its surplus), below.
        return GPTDataset(
            prefixes[0], num_samples, seq_length, seed, cache, split, vocab_size, ranges[0], split_string
        )
    if weights is None:
        blend = BlendedDataset.build_unweighted(
            prefixes,
            num_samples,
            seq_length,
            seed,
            cache,
            split,
            vocab_size,
            documents=ranges,
            split_string=split_string,
        )
        if len(blend) < num_samples:
            # Megatron caps the blend at the samples of one epoch of every prefix and the run
            # stops when they are used up; here the run does not start.
            raise GPTDatasetError(
                f"blend file {blend_json_path}: the {split!r} prefixes have no weights, so each "
                f"is read once (as Megatron does): {len(blend)} samples of seq_length "
                f"{seq_length}, fewer than the {num_samples} needed. Give them weights (then "
                "each is read over as many epochs as its share needs)"
            )
        return blend
    return BlendedDataset.build(
        prefixes,
        weights,
        num_samples,
        seq_length,
        seed,
        cache,
        split,
        vocab_size,
        documents=ranges,
        split_string=split_string,
    )


def split_has_share(blend_json_path: str | Path, split: str, split_string: str | None = None) -> bool:
    """Whether `split` of a blend file has prefixes to read: a per-split file's entry is not
    empty (data prep writes `"valid": []` when valid_fraction is 0), or the split string gives
    a file of one blend a share of it ("99,1,0": no test split). An unreadable file or split
    string counts as having one, so that `build_split_dataset` says what is wrong."""
    try:
        blend = load_blend(blend_json_path)
        if is_single_blend(blend):
            return (
                split_bounds(DEFAULT_SPLIT if split_string is None else split_string)[SPLITS.index(split)]
                is not None
            )
    except (GPTDatasetError, ValueError):
        return True
    return split in blend and blend[split] not in ([], "", None)
