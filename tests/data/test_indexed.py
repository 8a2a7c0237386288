import struct

import numpy as np
import pytest

from nemotron.data.indexed import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
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
