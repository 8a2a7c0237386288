"""Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``): writer and memory-mapped reader.

Byte layout (little-endian, no padding), as Megatron-Core's ``IndexedDataset`` reads it:

- ``.bin``: the token ids of every sequence, concatenated, no header.
- ``.idx``: magic ``MMIDIDX\\x00\\x00`` (9 bytes); version u64 = 1; dtype code u8;
  sequence count S u64; document-index count D u64 (documents + 1);
  sequence lengths int32[S]; sequence byte offsets into ``.bin`` int64[S];
  document indices int64[D] (starts at 0, last = S).

The writer streams: tokens go straight to the ``.bin`` file and sequence lengths to a spool
file, so memory stays bounded however large the shard grows. Everything is written under
temporary names and renamed only when complete (``.bin`` first, ``.idx`` last), so a
half-written shard never looks finished: a prefix is complete exactly when its ``.idx`` exists.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from nemotron.utils.fs import naming, temporary_name

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = len(INDEX_MAGIC) + 8 + 1 + 8 + 8  # 34 bytes

DTYPE_CODES: dict[type, int] = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}
CODE_DTYPES: dict[int, type] = {code: dtype for dtype, code in DTYPE_CODES.items()}

# Largest vocabulary stored as uint16 (Megatron's rule: uint16 when vocab < 65500, else int32).
UINT16_VOCAB_LIMIT = 65500

# Sequence lengths are int32 in the .idx.
MAX_SEQUENCE_LENGTH = (1 << 31) - 1

_CHUNK_ELEMENTS = 1 << 20  # elements per chunk when streaming the index arrays


class IndexedDatasetError(ValueError):
    """A ``.bin/.idx`` pair is missing, truncated or not in Megatron's indexed format."""


def token_dtype_for_vocab(vocab_size: int) -> type:
    """Token dtype Megatron uses for a vocabulary: uint16 below 65500 entries, else int32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.uint16 if vocab_size < UINT16_VOCAB_LIMIT else np.int32


def dtype_code(dtype) -> int:
    """Megatron's one-byte code for a numpy dtype."""
    key = np.dtype(dtype).type
    if key not in DTYPE_CODES:
        raise ValueError(f"dtype {np.dtype(dtype)} has no Megatron indexed-dataset code")
    return DTYPE_CODES[key]


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def prefix_exists(prefix: str | os.PathLike) -> bool:
    """True when both files of a finished prefix are present."""
    return bin_path(prefix).is_file() and idx_path(prefix).is_file()


SEAL_END_BYTES = 1 << 16  # 64 KiB: every rank reads 256 KiB per shard at open


def shard_seal(prefix: str | os.PathLike) -> dict[str, int | str]:
    """What data prep records of a finished shard to know it again without reading it: both
    files' sizes and one sha256 over the first and last 64 KiB of each (`.idx`, then `.bin`).

    Megatron's format does not tie an `.idx` to its `.bin`: two shards of the same byte size
    with their `.idx` (or `.bin`) exchanged pass every check of the index, and read other
    tokens. Their heads differ (the first documents' lengths, the first tokens), so the seal
    tells them apart, at the cost of reading 256 KiB, not a pass over the data."""
    digest = hashlib.sha256()
    seal: dict[str, int | str] = {}
    for suffix, path in (("idx", idx_path(prefix)), ("bin", bin_path(prefix))):
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            digest.update(f.read(SEAL_END_BYTES))
            if size > SEAL_END_BYTES:
                f.seek(max(SEAL_END_BYTES, size - SEAL_END_BYTES))
                digest.update(f.read())
        seal[f"{suffix}_bytes"] = size
    seal["ends_sha256"] = digest.hexdigest()
    return seal


def seal_difference(prefix: str | os.PathLike, recorded: dict) -> str | None:
    """How the shard at `prefix` differs from the seal recorded of it (`shard_seal`), or None
    when it matches. A file that cannot be read, and a seal that is not one (a key missing or
    of another type), are differences, named."""
    for key, kind in (("idx_bytes", int), ("bin_bytes", int), ("ends_sha256", str)):
        value = recorded.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"its recorded seal has no valid {key!r} ({value!r})"
    try:
        now = shard_seal(prefix)
    except OSError as e:
        return f"cannot be read ({e.strerror or e}: {e.filename})"
    for suffix, path in (("idx", idx_path(prefix)), ("bin", bin_path(prefix))):
        key = f"{suffix}_bytes"
        if recorded[key] != now[key]:
            return f"{path.name} is {now[key]:,} bytes, recorded {recorded[key]:,}"
    if recorded["ends_sha256"] != now["ends_sha256"]:
        return "the first or last 64 KiB of its .idx or .bin differ from what was recorded"
    return None


def _temp_name(path: Path) -> Path:
    # Unique per writer, so two writers of the same prefix (a resumed run racing an orphaned
    # worker of a killed one) never interleave bytes in one file; named with its writer, so
    # that what a killed one left can be told from a live one's (`remove_stale_temporaries`).
    return temporary_name(path)


class IndexedDatasetWriter:
    """Streams documents into a Megatron ``.bin/.idx`` pair.

    Each ``add_document(tokens)`` appends one sequence that forms one document.
    ``finalize()`` writes the index and renames the files into place; until then only
    temporary files exist. Use as a context manager to discard the temporaries on error.
    """

    def __init__(self, prefix: str | os.PathLike, dtype=np.int32):
        self.prefix = Path(os.fspath(prefix))
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = _temp_name(bin_path(self.prefix))
        self._len_tmp = _temp_name(self.prefix.with_name(self.prefix.name + ".lengths"))
        self._bin = open(self._bin_tmp, "wb")
        try:
            self._lengths = open(self._len_tmp, "wb")
        except BaseException:  # (no writer comes back to discard the first)
            self._bin.close()
            self._bin_tmp.unlink(missing_ok=True)
            raise
        self._idx_tmp: Path | None = None  # named when finalize writes it
        self._pending_lengths: list[int] = []
        self.num_sequences = 0
        self.num_tokens = 0
        self._closed = False

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        array = np.asarray(tokens)
        if array.ndim != 1:
            raise ValueError(f"a document must be a 1-D token sequence, got shape {array.shape}")
        if array.size > MAX_SEQUENCE_LENGTH:
            # The .idx stores lengths as int32: a longer sequence cannot be indexed.
            raise ValueError(
                f"{self.prefix}: a document of {array.size} tokens is longer than the indexed "
                f"format's limit of {MAX_SEQUENCE_LENGTH} tokens per sequence"
            )
        if array.size and array.dtype != self.dtype:
            if np.issubdtype(array.dtype, np.integer):
                info = np.iinfo(self.dtype)
                if array.min() < info.min or array.max() > info.max:
                    raise ValueError(
                        f"token ids out of range for {self.dtype} in {self.prefix}: "
                        f"[{array.min()}, {array.max()}]"
                    )
            array = array.astype(self.dtype)
        with naming(bin_path(self.prefix)):  # a full disk says where
            self._bin.write(np.ascontiguousarray(array, dtype=self.dtype).tobytes())
        self._pending_lengths.append(int(array.size))
        self.num_sequences += 1
        self.num_tokens += int(array.size)
        if len(self._pending_lengths) >= 65536:
            self._flush_lengths()

    def add_documents(self, documents: Iterable[Sequence[int] | np.ndarray]) -> None:
        for tokens in documents:
            self.add_document(tokens)

    def add_raw(self, token_bytes: bytes | memoryview, lengths: np.ndarray) -> None:
        """Append pre-encoded sequences (bytes in this writer's dtype) with their lengths."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.size and (int(lengths.min()) < 0 or int(lengths.max()) > MAX_SEQUENCE_LENGTH):
            raise ValueError(
                f"{self.prefix}: add_raw: sequence lengths must be in [0, {MAX_SEQUENCE_LENGTH}]"
            )
        if int(lengths.sum()) * self.dtype.itemsize != len(token_bytes):
            raise ValueError("add_raw: byte count does not match the sum of lengths")
        self._flush_lengths()
        with naming(bin_path(self.prefix)):
            self._bin.write(token_bytes)
            self._lengths.write(lengths.astype("<i4").tobytes())
        self.num_sequences += int(lengths.size)
        self.num_tokens += int(lengths.sum())

    def _flush_lengths(self) -> None:
        if self._pending_lengths:
            with naming(bin_path(self.prefix)):
                self._lengths.write(np.asarray(self._pending_lengths, dtype="<i4").tobytes())
            self._pending_lengths.clear()

    def finalize(self) -> Path:
        """Write the ``.idx``, rename both files into place; returns the prefix. If that fails
        (a full disk), the temporary files are removed and the error raised."""
        if self._closed:
            raise RuntimeError(f"writer for {self.prefix} is already closed")
        try:
            return self._finalize()
        except BaseException:
            # Also when called by __exit__ (which only discards on an error in the block): the
            # .bin temporary is a whole shard, and on a full disk it is what a rerun needs.
            self.discard()
            raise

    def _finalize(self) -> Path:
        self._flush_lengths()
        with naming(bin_path(self.prefix)):
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            self._lengths.close()
        idx_final = idx_path(self.prefix)
        idx_tmp = self._idx_tmp = _temp_name(idx_final)
        count = self.num_sequences
        with naming(idx_final), open(idx_tmp, "wb") as out, open(self._len_tmp, "rb") as lengths_in:
            out.write(INDEX_MAGIC)
            out.write(struct.pack("<Q", INDEX_VERSION))
            out.write(struct.pack("<B", self._code))
            out.write(struct.pack("<Q", count))
            out.write(struct.pack("<Q", count + 1))
            # Lengths, streamed from the spool in chunks.
            while chunk := lengths_in.read(4 * _CHUNK_ELEMENTS):
                out.write(chunk)
            # Byte offsets: running sum of lengths * itemsize, in chunks.
            lengths_in.seek(0)
            offset = 0
            while chunk := lengths_in.read(4 * _CHUNK_ELEMENTS):
                lens = np.frombuffer(chunk, dtype="<i4").astype(np.int64) * self.dtype.itemsize
                pointers = np.empty_like(lens)
                pointers[0] = offset
                np.cumsum(lens[:-1], out=pointers[1:])
                pointers[1:] += offset
                offset += int(lens.sum())
                out.write(pointers.astype("<i8").tobytes())
            # One sequence per document: document indices 0..S.
            for start in range(0, count + 1, _CHUNK_ELEMENTS):
                stop = min(count + 1, start + _CHUNK_ELEMENTS)
                out.write(np.arange(start, stop, dtype="<i8").tobytes())
            out.flush()
            os.fsync(out.fileno())
        os.unlink(self._len_tmp)
        # Over an existing prefix, the old .idx goes first: between the two renames the pair
        # would otherwise be the new .bin with the old .idx, which looks complete and may even
        # validate (a longer .bin) while reading the wrong tokens. Without an .idx the prefix
        # is plainly unfinished; the new files are complete (and synced) at this point.
        idx_final.unlink(missing_ok=True)
        os.replace(self._bin_tmp, bin_path(self.prefix))
        os.replace(idx_tmp, idx_final)
        self._closed = True
        return self.prefix

    def discard(self) -> None:
        """Close and delete the temporary files without producing a dataset."""
        if self._closed:
            return
        self._closed = True
        for handle in (self._bin, self._lengths):
            handle.close()
        for path in (self._bin_tmp, self._len_tmp, self._idx_tmp):
            if path is not None:
                path.unlink(missing_ok=True)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
        elif not self._closed:
            self.finalize()


class IndexedDataset:
    """Memory-mapped reader of a Megatron ``.bin/.idx`` pair.

    The index is validated when the pair is opened (see ``_validate``): a file that would make
    a reader return wrong tokens or fail later with a bare ``IndexError`` is rejected at once
    with an ``IndexedDatasetError`` naming it. With ``vocab_size`` every sequence handed out is
    also checked to hold token ids in ``[0, vocab_size)`` (a check over the tokens read, so it
    costs nothing next to using them; scanning a whole ``.bin`` at open would cost a read of
    the dataset).
    """

    def __init__(self, prefix: str | os.PathLike, vocab_size: int | None = None):
        self.prefix = Path(os.fspath(prefix))
        self.vocab_size = vocab_size
        index_file, data_file = idx_path(self.prefix), bin_path(self.prefix)
        for path in (index_file, data_file):
            if path.exists() and not path.is_file():
                raise IndexedDatasetError(f"{path}: not a regular file (a directory, a device or a pipe)")
            if not path.is_file():
                raise FileNotFoundError(f"indexed dataset file not found: {path}")
        size = index_file.stat().st_size
        if size < HEADER_SIZE:
            raise IndexedDatasetError(f"{index_file}: {size} bytes is shorter than the header")
        with open(index_file, "rb") as handle:
            header = handle.read(HEADER_SIZE)
        if header[:9] != INDEX_MAGIC:
            raise IndexedDatasetError(f"{index_file}: bad magic {header[:9]!r}, not a Megatron index")
        (version,) = struct.unpack_from("<Q", header, 9)
        if version != INDEX_VERSION:
            raise IndexedDatasetError(f"{index_file}: unsupported index version {version}")
        (code,) = struct.unpack_from("<B", header, 17)
        if code not in CODE_DTYPES:
            raise IndexedDatasetError(f"{index_file}: unknown dtype code {code}")
        self.dtype = np.dtype(CODE_DTYPES[code])
        (count,) = struct.unpack_from("<Q", header, 18)
        (doc_count,) = struct.unpack_from("<Q", header, 26)
        expected = HEADER_SIZE + count * 4 + count * 8 + doc_count * 8
        if size != expected:
            raise IndexedDatasetError(
                f"{index_file}: {size} bytes, expected {expected} for {count} sequences"
            )
        self._index = np.memmap(index_file, dtype=np.uint8, mode="r")
        offset = HEADER_SIZE
        self.sequence_lengths = np.frombuffer(self._index, dtype="<i4", count=count, offset=offset)
        offset += count * 4
        self.sequence_pointers = np.frombuffer(self._index, dtype="<i8", count=count, offset=offset)
        offset += count * 8
        self.document_indices = np.frombuffer(self._index, dtype="<i8", count=doc_count, offset=offset)
        data_size = data_file.stat().st_size
        self._validate(index_file, data_file, data_size)
        self._data: np.ndarray
        if data_size:
            self._data = np.memmap(data_file, dtype=self.dtype, mode="r")
        else:
            self._data = np.zeros(0, dtype=self.dtype)

    def _validate(self, index_file: Path, data_file: Path, data_size: int) -> None:
        """Structure of the index against itself and the ``.bin`` size, in bounded memory.

        Lengths are non-negative; byte offsets are multiples of the item size, non-decreasing,
        and each sequence ends inside the ``.bin``, the last end being the ``.bin``'s size;
        document indices start at 0, never decrease and end at the sequence count. (Megatron
        writes sequences back to back; of that, only these properties are needed to read every
        sequence correctly, and the .bin's size to tell its index from another shard's.)
        """
        itemsize = self.dtype.itemsize
        if data_size % itemsize:
            raise IndexedDatasetError(
                f"{data_file}: {data_size} bytes is not a whole number of {self.dtype} tokens"
            )
        count = self.sequence_lengths.size
        previous = end = 0
        for start in range(0, count, _CHUNK_ELEMENTS):
            stop = min(count, start + _CHUNK_ELEMENTS)
            lengths = self.sequence_lengths[start:stop].astype(np.int64)
            pointers = self.sequence_pointers[start:stop]
            bad = np.flatnonzero(lengths < 0)
            if bad.size:
                i = start + int(bad[0])
                raise IndexedDatasetError(
                    f"{index_file}: sequence {i} has negative length {int(lengths[bad[0]])}"
                )
            steps = np.diff(pointers, prepend=np.int64(previous))
            bad = np.flatnonzero((pointers < 0) | (steps < 0) | (pointers % itemsize != 0))
            if bad.size:
                i = start + int(bad[0])
                raise IndexedDatasetError(
                    f"{index_file}: sequence {i} starts at byte offset {int(pointers[bad[0]])}, "
                    "not a non-decreasing multiple of the token size"
                )
            # Compared as room left after the offset, never as offset + bytes: an offset near
            # 2**63 would overflow the sum to a negative "end" and pass for a sequence inside.
            bad = np.flatnonzero((pointers > data_size) | (lengths * itemsize > data_size - pointers))
            if bad.size:
                i = start + int(bad[0])
                raise IndexedDatasetError(
                    f"{index_file}: sequence {i} (offset {int(pointers[bad[0]])}, "
                    f"{int(lengths[bad[0]])} tokens) ends past the end of {data_file} "
                    f"({data_size} bytes)"
                )
            previous = int(pointers[-1])
            end = max(end, int((pointers + lengths * itemsize).max()))
        if end != data_size:
            # Megatron writes the sequences back to back, filling the .bin exactly: bytes no
            # sequence covers mean an index of another shard (swapped, or copied over from an
            # earlier build) whose offsets happen to fit, which would read wrong tokens.
            raise IndexedDatasetError(
                f"{index_file}: its sequences end at byte {end} but {data_file} has {data_size} "
                f"bytes: not this .bin's index (a .idx and .bin of different shards or builds)"
            )
        documents = self.document_indices
        if documents.size == 0 or int(documents[0]) != 0 or int(documents[-1]) != count:
            raise IndexedDatasetError(
                f"{index_file}: document indices must run from 0 to the sequence count {count}"
            )
        for start in range(0, documents.size, _CHUNK_ELEMENTS):
            chunk = documents[max(0, start - 1) : start + _CHUNK_ELEMENTS]
            if chunk.size > 1 and bool((np.diff(chunk) < 0).any()):
                raise IndexedDatasetError(f"{index_file}: document indices decrease")

    def __getstate__(self) -> dict:
        # Re-opened (and re-validated) from the files in another process, never copied.
        return {"prefix": self.prefix, "vocab_size": self.vocab_size}

    def __setstate__(self, state: dict) -> None:
        IndexedDataset.__init__(self, state["prefix"], state.get("vocab_size"))

    def __len__(self) -> int:
        return int(self.sequence_lengths.size)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def _start(self, i: int) -> int:
        return int(self.sequence_pointers[i]) // self.dtype.itemsize

    def _sequence(self, i: int) -> np.ndarray:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"IndexedDataset indices must be integers, got {type(i).__name__}")
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for {n} sequences in {self.prefix}")
        start = self._start(i)
        return self._data[start : start + int(self.sequence_lengths[i])]

    def _checked(self, i: int, tokens: np.ndarray) -> np.ndarray:
        if self.vocab_size is not None and tokens.size:
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.vocab_size:
                raise IndexedDatasetError(
                    f"{bin_path(self.prefix)}: sequence {i} holds token id "
                    f"{low if low < 0 else high}, outside the vocabulary [0, {self.vocab_size})"
                )
        return tokens

    def __getitem__(self, i: int) -> np.ndarray:
        return self._checked(i, self._sequence(i))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of sequence ``i`` (to its end if length is None)."""
        sequence = self._sequence(i)
        if offset < 0 or offset > sequence.size:
            raise IndexError(f"offset {offset} out of range for sequence {i} of {sequence.size} tokens")
        stop = sequence.size if length is None else offset + length
        if stop > sequence.size:
            raise IndexError(f"offset {offset} + length {length} beyond sequence {i} of {sequence.size}")
        return self._checked(i, sequence[offset:stop])

    def check_vocab(self, vocab_size: int) -> None:
        """Scan every token of the ``.bin`` (in chunks) for ids outside ``[0, vocab_size)``.

        Reads the whole file: for tools and tests; training checks the sequences it reads."""
        step = max(1, (64 << 20) // self.dtype.itemsize)
        for begin in range(0, self._data.size, step):
            chunk = self._data[begin : begin + step]
            low, high = int(chunk.min()), int(chunk.max())
            if low < 0 or high >= vocab_size:
                raise IndexedDatasetError(
                    f"{bin_path(self.prefix)}: token id {low if low < 0 else high} outside the "
                    f"vocabulary [0, {vocab_size})"
                )

    def __repr__(self) -> str:
        return f"IndexedDataset({str(self.prefix)!r}, sequences={len(self)}, dtype={self.dtype})"
