import struct

import numpy as np
import pytest

from nemotron.data.indexed import (
    SEAL_END_BYTES,
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    seal_difference,
    shard_seal,
    token_dtype_for_vocab,
)

from .megatron_format import read_index, read_sequences


def _corpus(rng, n=50, vocab=60000):
    return [rng.integers(0, vocab, size=int(rng.integers(0, 40))).tolist() for _ in range(n)]


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4), (np.int64, 5), (np.uint8, 1)])
def test_header_bytes_match_format(tmp_path, dtype, code):
    prefix = tmp_path / "shard"
    with IndexedDatasetWriter(prefix, dtype) as writer:
        writer.add_document([1, 2, 3])
        writer.add_document([4, 5])
    raw = (tmp_path / "shard.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert raw[9:17] == struct.pack("<Q", 1)
    assert raw[17:18] == bytes([code])
    assert raw[18:26] == struct.pack("<Q", 2)  # sequences
    assert raw[26:34] == struct.pack("<Q", 3)  # documents + 1
    itemsize = np.dtype(dtype).itemsize
    assert raw[34:42] == struct.pack("<ii", 3, 2)
    assert raw[42:58] == struct.pack("<qq", 0, 3 * itemsize)
    assert raw[58:] == struct.pack("<qqq", 0, 1, 2)
    assert (tmp_path / "shard.bin").read_bytes() == np.array([1, 2, 3, 4, 5], dtype=dtype).tobytes()


def test_every_token_round_trips_through_independent_reader(tmp_path):
    rng = np.random.default_rng(0)
    docs = _corpus(rng)
    prefix = tmp_path / "data"
    writer = IndexedDatasetWriter(prefix, np.uint16)
    for doc in docs:
        writer.add_document(doc)
    writer.finalize()
    assert read_sequences(prefix) == docs
    index = read_index(prefix)
    assert index["documents"] == list(range(len(docs) + 1))

    dataset = IndexedDataset(prefix)
    assert len(dataset) == len(docs)
    assert dataset.dtype == np.uint16
    assert dataset.sequence_lengths.tolist() == [len(d) for d in docs]
    assert dataset.document_indices.tolist() == list(range(len(docs) + 1))
    assert dataset.num_tokens == sum(len(d) for d in docs)
    for i, doc in enumerate(docs):
        assert dataset[i].tolist() == doc
    longest = int(np.argmax(dataset.sequence_lengths))
    assert dataset.get(longest, 2, 5).tolist() == docs[longest][2:7]
    assert dataset.get(longest, 3).tolist() == docs[longest][3:]
    assert dataset[-1].tolist() == docs[-1]
    with pytest.raises(IndexError):
        dataset[len(docs)]
    with pytest.raises(IndexError):
        dataset.get(longest, 0, len(docs[longest]) + 1)


def test_large_shard_streams_index_in_chunks(tmp_path, monkeypatch):
    # Force tiny chunks so the chunked pointer/doc-index code paths cross chunk boundaries.
    import nemotron.data.indexed as indexed

    monkeypatch.setattr(indexed, "_CHUNK_ELEMENTS", 7)
    rng = np.random.default_rng(1)
    docs = _corpus(rng, n=40, vocab=200000)
    with IndexedDatasetWriter(tmp_path / "big", np.int32) as writer:
        writer.add_documents(docs)
    assert read_sequences(tmp_path / "big") == docs
    assert read_index(tmp_path / "big")["documents"] == list(range(41))


def test_nothing_looks_finished_before_finalize(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "part", np.int32)
    writer.add_document([1, 2, 3])
    assert not (tmp_path / "part.bin").exists()
    assert not (tmp_path / "part.idx").exists()
    writer.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.bin", "part.idx"]


def test_error_discards_temporaries(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "part", np.int32) as writer:
            writer.add_document([1])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_writing_the_index_leaves_nothing_and_keeps_the_old_prefix(tmp_path, monkeypatch):
    """ENOSPC part-way through the .idx, in `finalize` called by the `with` block's end: every
    temporary was left behind, the .bin one a whole shard (in the work dir a rerun keeps, on
    the disk that is full). The earlier prefix stays readable."""
    import builtins
    import errno

    from nemotron.data import indexed

    with IndexedDatasetWriter(tmp_path / "part", np.int32) as writer:
        writer.add_document([7, 8])
    real_open = builtins.open

    class FillsUp:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(bytes(data)[:3])
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def opening(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FillsUp(f) if str(path).endswith(".tmp") and ".idx." in str(path) and "w" in mode else f

    monkeypatch.setattr(indexed, "open", opening, raising=False)
    with pytest.raises(OSError, match="No space") as failure:
        with IndexedDatasetWriter(tmp_path / "part", np.int32) as writer:
            writer.add_document([1, 2, 3])
    assert failure.value.filename == str(tmp_path / "part.idx")  # says where the disk is full
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part.bin", "part.idx"]
    assert IndexedDataset(tmp_path / "part")[0].tolist() == [7, 8]


def test_a_writer_that_cannot_create_its_second_file_leaves_nothing(tmp_path, monkeypatch):
    import builtins
    import errno

    from nemotron.data import indexed

    real_open = builtins.open

    def opening(path, mode="r", *args, **kwargs):
        if ".lengths." in str(path):  # out of inodes after the first file
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(indexed, "open", opening, raising=False)
    with pytest.raises(OSError, match="No space"):
        IndexedDatasetWriter(tmp_path / "part", np.int32)
    assert list(tmp_path.iterdir()) == []


def test_out_of_range_tokens_rejected(tmp_path):
    with IndexedDatasetWriter(tmp_path / "p", np.uint16) as writer:
        with pytest.raises(ValueError, match="out of range"):
            writer.add_document([70000])
        writer.add_document([1])


def test_empty_dataset(tmp_path):
    with IndexedDatasetWriter(tmp_path / "empty", np.uint16):
        pass
    dataset = IndexedDataset(tmp_path / "empty")
    assert len(dataset) == 0
    assert dataset.document_indices.tolist() == [0]


def test_truncated_or_foreign_index_is_a_clear_error(tmp_path):
    with IndexedDatasetWriter(tmp_path / "p", np.int32) as writer:
        writer.add_document([1, 2, 3])
    raw = (tmp_path / "p.idx").read_bytes()
    (tmp_path / "p.idx").write_bytes(raw[:-4])
    with pytest.raises(IndexedDatasetError, match="p.idx"):
        IndexedDataset(tmp_path / "p")
    (tmp_path / "p.idx").write_bytes(b"NOTMAGIC!" + raw[9:])
    with pytest.raises(IndexedDatasetError, match="magic"):
        IndexedDataset(tmp_path / "p")
    with pytest.raises(FileNotFoundError):
        IndexedDataset(tmp_path / "missing")


def test_dtype_from_vocab_size():
    assert token_dtype_for_vocab(1000) is np.uint16
    assert token_dtype_for_vocab(65499) is np.uint16
    assert token_dtype_for_vocab(65500) is np.int32
    assert token_dtype_for_vocab(131072) is np.int32


# --- validation at open: a corrupt index is one error naming the file --------------------------


def _good_pair(tmp_path, dtype=np.uint16):
    prefix = tmp_path / "shard"
    with IndexedDatasetWriter(prefix, dtype) as writer:
        for doc in ([5, 6, 7], [8, 9], [10, 11, 12, 13]):
            writer.add_document(doc)
    return prefix


def _patch_index(prefix, field, position, value):
    """Overwrite one entry of the .idx arrays (lengths int32, pointers/documents int64)."""
    raw = bytearray((prefix.parent / (prefix.name + ".idx")).read_bytes())
    count = struct.unpack_from("<Q", raw, 18)[0]
    offsets = {
        "length": (34, "<i", 4),
        "pointer": (34 + 4 * count, "<q", 8),
        "document": (34 + 12 * count, "<q", 8),
    }
    start, fmt, size = offsets[field]
    struct.pack_into(fmt, raw, start + size * position, value)
    (prefix.parent / (prefix.name + ".idx")).write_bytes(bytes(raw))


CORRUPTIONS = {
    # name: (change, words the error must contain)
    "negative length": (lambda p: _patch_index(p, "length", 1, -2), "sequence 1 has negative length -2"),
    "length past the end": (lambda p: _patch_index(p, "length", 2, 400), "ends past the end of"),
    "offset past the end": (lambda p: _patch_index(p, "pointer", 2, 1 << 40), "ends past the end of"),
    # An offset near 2**63 makes offset + length overflow to a negative end: the sequence
    # passed as inside the .bin and read back empty.
    "offset overflows": (lambda p: _patch_index(p, "pointer", 2, (1 << 63) - 2), "ends past the end of"),
    "offsets decrease": (lambda p: _patch_index(p, "pointer", 2, 2), "not a non-decreasing"),
    "odd offset": (lambda p: _patch_index(p, "pointer", 1, 7), "not a non-decreasing multiple"),
    "document indices": (lambda p: _patch_index(p, "document", 3, 2), "document indices"),
    # An index whose sequences fit inside the .bin but do not fill it: another shard's index
    # (swapped) or a shortened last length read wrong tokens without a word.
    "last length shortened": (lambda p: _patch_index(p, "length", 2, 3), "not this .bin's index"),
    "bytes past the last sequence": (
        lambda p: p.with_name("shard.bin").write_bytes(p.with_name("shard.bin").read_bytes() + b"\0\0"),
        "its sequences end at byte 18 but",
    ),
    "truncated bin": (
        lambda p: p.with_name("shard.bin").write_bytes(p.with_name("shard.bin").read_bytes()[:-1]),
        "whole number",
    ),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_index_is_rejected_at_open_naming_the_file(tmp_path, name):
    prefix = _good_pair(tmp_path)
    change, words = CORRUPTIONS[name]
    change(prefix)
    with pytest.raises(IndexedDatasetError, match=r"shard\.(idx|bin)") as info:
        IndexedDataset(prefix)
    assert words in str(info.value)


def test_an_index_swapped_between_two_shards_is_refused(tmp_path):
    """Two shards of one build, their .idx files swapped: the shorter shard's index fits inside
    the longer shard's .bin (every offset in bounds), so it was accepted and read the other
    shard's first tokens. The index must describe its .bin whole."""
    with IndexedDatasetWriter(tmp_path / "a", np.uint16) as writer:
        for doc in ([5, 6, 7], [8, 9], [10, 11, 12, 13]):
            writer.add_document(doc)
    with IndexedDatasetWriter(tmp_path / "b", np.uint16) as writer:
        writer.add_document([20, 21, 22, 23, 24])
    a_idx, b_idx = (tmp_path / "a.idx").read_bytes(), (tmp_path / "b.idx").read_bytes()
    (tmp_path / "a.idx").write_bytes(b_idx)
    (tmp_path / "b.idx").write_bytes(a_idx)
    with pytest.raises(
        IndexedDatasetError,
        match=r"a\.idx: its sequences end at byte 10 but .*a\.bin has 18 bytes: not this \.bin's index",
    ):
        IndexedDataset(tmp_path / "a")
    with pytest.raises(IndexedDatasetError, match=r"b\.idx: sequence 2 .* ends past the end of"):
        IndexedDataset(tmp_path / "b")
    with IndexedDatasetWriter(tmp_path / "empty", np.uint16):
        pass
    assert len(IndexedDataset(tmp_path / "empty")) == 0


def test_token_ids_are_checked_against_the_vocabulary(tmp_path):
    prefix = _good_pair(tmp_path)
    dataset = IndexedDataset(prefix, vocab_size=12)
    assert dataset[0].tolist() == [5, 6, 7] and dataset.get(2, 0, 2).tolist() == [10, 11]
    with pytest.raises(
        IndexedDatasetError,
        match=r"shard\.bin: sequence 2 holds token id 13, outside the vocabulary \[0, 12\)",
    ):
        dataset.get(2, 1)
    with pytest.raises(IndexedDatasetError, match="shard.bin: sequence 2"):
        dataset[2]
    with pytest.raises(IndexedDatasetError, match="token id 13"):
        dataset.check_vocab(12)
    IndexedDataset(prefix, vocab_size=14).check_vocab(14)
    # Re-opened in another process (DataLoader worker) with the same check.
    import pickle

    with pytest.raises(IndexedDatasetError):
        pickle.loads(pickle.dumps(dataset))[2]


def test_rewriting_a_prefix_never_pairs_the_new_bin_with_the_old_idx(tmp_path, monkeypatch):
    # A writer stopped between its two renames (here: the .idx rename fails) over an existing
    # prefix left the new .bin beside the old .idx: it opened, validated (the new .bin is
    # longer) and read the new tokens through the old index.
    import os

    prefix = tmp_path / "p"
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([1, 2, 3])
    real_replace = os.replace

    def replace(source, target):
        if str(target).endswith(".idx"):
            raise OSError("killed between the renames")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    writer = IndexedDatasetWriter(prefix, np.uint16)
    writer.add_document([9, 9, 9, 9, 9])
    with pytest.raises(OSError, match="killed"):
        writer.finalize()
    assert not (tmp_path / "p.idx").exists()  # unfinished, not the old index over new data
    monkeypatch.setattr(os, "replace", real_replace)
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document([9, 9, 9, 9, 9])
    assert IndexedDataset(prefix)[0].tolist() == [9, 9, 9, 9, 9]


def test_a_document_longer_than_int32_lengths_is_refused_naming_the_prefix(tmp_path):
    # The .idx stores int32 lengths; a zero-stride view stands in for 2**31 tokens (no memory).
    huge = np.broadcast_to(np.uint16(1), ((1 << 31),))
    with IndexedDatasetWriter(tmp_path / "p", np.uint16) as writer:
        with pytest.raises(ValueError, match=r"p: a document of 2147483648 tokens is longer"):
            writer.add_document(huge)
        writer.add_document([1])
    assert IndexedDataset(tmp_path / "p")[0].tolist() == [1]


def _shard(prefix, documents):
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for document in documents:
            writer.add_document(document)
    return prefix


def test_equal_size_shards_with_exchanged_idx_pass_the_index_checks_but_not_the_seal(tmp_path):
    # Same sequence count, same tokens in all, so the same .bin and .idx sizes; other lengths.
    a = _shard(tmp_path / "a", [list(range(1, 11)), list(range(11, 31))])
    b = _shard(tmp_path / "b", [list(range(101, 121)), list(range(121, 131))])
    seals = {"a": shard_seal(a), "b": shard_seal(b)}
    assert seals["a"]["idx_bytes"] == seals["b"]["idx_bytes"]
    assert seals["a"]["bin_bytes"] == seals["b"]["bin_bytes"] == 60
    assert seals["a"]["ends_sha256"] != seals["b"]["ends_sha256"]
    assert seal_difference(a, seals["a"]) is None and seal_difference(b, seals["b"]) is None

    idx_a, idx_b = (tmp_path / "a.idx").read_bytes(), (tmp_path / "b.idx").read_bytes()
    (tmp_path / "a.idx").write_bytes(idx_b)
    (tmp_path / "b.idx").write_bytes(idx_a)
    swapped = IndexedDataset(a)  # every check of the index alone passes...
    assert swapped[0].tolist() == list(range(1, 21))  # ...and reads the wrong document bounds
    assert "differ from what was recorded" in seal_difference(a, seals["a"])
    assert "differ from what was recorded" in seal_difference(b, seals["b"])


def test_seal_reads_the_first_and_last_64_kib_and_names_a_size_change(tmp_path):
    tokens = 3 * SEAL_END_BYTES // 2 + 1000  # a .bin of 3 x 64 KiB and more: head, middle, tail
    prefix = _shard(tmp_path / "p", [np.arange(tokens, dtype=np.uint16) % 5000])
    seal = shard_seal(prefix)
    assert seal["bin_bytes"] == 2 * tokens
    path = tmp_path / "p.bin"
    original = bytearray(path.read_bytes())

    def flipped(position):
        data = bytearray(original)
        data[position] ^= 0xFF
        path.write_bytes(bytes(data))
        return seal_difference(prefix, seal)

    assert "differ from what was recorded" in flipped(10)  # first 64 KiB
    assert "differ from what was recorded" in flipped(len(original) - 10)  # last 64 KiB
    assert flipped(len(original) // 2) is None  # the middle is not read (by design: no data pass)
    path.write_bytes(bytes(original[:-2]))
    assert (
        seal_difference(prefix, seal) == f"p.bin is {len(original) - 2:,} bytes, recorded {len(original):,}"
    )
    path.unlink()
    assert seal_difference(prefix, seal).startswith("cannot be read (")
    assert str(path) in seal_difference(prefix, seal)


@pytest.mark.parametrize(
    "damage, named",
    [
        ({"idx_bytes": "82"}, "'idx_bytes' ('82')"),
        ({"bin_bytes": True}, "'bin_bytes' (True)"),
        ({"ends_sha256": None}, "'ends_sha256' (None)"),
        ({"bin_bytes": None, "idx_bytes": None, "ends_sha256": None}, "'idx_bytes' (None)"),
    ],
)
def test_a_damaged_seal_is_a_difference_named_not_a_match_or_a_crash(tmp_path, damage, named):
    prefix = _shard(tmp_path / "p", [[1, 2, 3]])
    seal = shard_seal(prefix) | damage
    seal = {k: v for k, v in seal.items() if v is not None}
    assert seal_difference(prefix, seal) == f"its recorded seal has no valid {named}"
