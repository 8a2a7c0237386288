import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from nemotron.data import sources as src

from .conftest import make_docs, write_jsonl


def _texts(plan, field="text"):
    out = []
    for piece in plan.pieces:
        for record in src.iter_records(piece, field):
            assert record.bad_kind is None, record
            out.append(record.text)
    return out


def test_plain_gz_zst_jsonl(tmp_path):
    docs = make_docs(30, seed=5)
    write_jsonl(tmp_path / "plain.jsonl", docs)
    payload = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(payload))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
    for name in ("plain.jsonl", "c.jsonl.gz", "c.jsonl.zst"):
        plan = src.plan_source(str(tmp_path / name))
        assert _texts(plan) == docs, name
        assert plan.description["files"][0]["size"] == (tmp_path / name).stat().st_size


@pytest.mark.parametrize("piece_bytes", [1, 17, 100, 333, 10_000_000])
def test_byte_range_pieces_cover_every_line_once(tmp_path, piece_bytes):
    docs = make_docs(40, seed=6)
    write_jsonl(tmp_path / "x.jsonl", docs)
    plan = src.plan_source(str(tmp_path / "x.jsonl"), piece_bytes=piece_bytes)
    assert _texts(plan) == docs


def test_parquet_txt_directory_and_glob(tmp_path):
    docs = make_docs(12, seed=7)
    pq.write_table(pa.table({"content": docs[:6]}), tmp_path / "a.parquet", row_group_size=2)
    pq.write_table(pa.table({"content": docs[6:]}), tmp_path / "b.parquet", row_group_size=4)
    plan = src.plan_source(str(tmp_path / "*.parquet"))
    assert _texts(plan, "content") == docs

    txt = tmp_path / "txt"
    txt.mkdir()
    for i, doc in enumerate(docs[:3]):
        (txt / f"{i}.txt").write_text(doc)
    (txt / "ignored.bin").write_bytes(b"\x00")
    assert _texts(src.plan_source(str(txt))) == docs[:3]

    mixed = tmp_path / "mixed"
    write_jsonl(mixed / "1.jsonl", docs[:2])
    write_jsonl(mixed / "sub" / "2.jsonl", docs[2:4])
    assert _texts(src.plan_source(str(mixed))) == docs[:4]
    relative = src.plan_source("mixed/**/*.jsonl", base_dir=tmp_path)
    assert _texts(relative) == docs[:4]


def _hub_layout(root, docs_hq, docs_low):
    """A directory laid out as a hub dataset repository with two configs (subsets)."""
    (root / "hq").mkdir(parents=True)
    (root / "low").mkdir()
    pq.write_table(pa.table({"text": docs_hq[:5]}), root / "hq" / "part-00000.parquet")
    pq.write_table(pa.table({"text": docs_hq[5:]}), root / "hq" / "part-00001.parquet")
    pq.write_table(pa.table({"text": docs_low}), root / "low" / "part-00000.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: High-Quality\n  data_files:\n  - split: train\n    path: hq/*.parquet\n"
        "- config_name: Low\n  data_files:\n  - split: train\n    path: low/*.parquet\n"
        "---\n# test dataset\n"
    )


def test_hub_code_path_on_local_hub_layout(tmp_path):
    hq, low = make_docs(9, seed=8, prefix="HQ "), make_docs(4, seed=9, prefix="LOW ")
    repo = tmp_path / "Nemotron-Fake"
    _hub_layout(repo, hq, low)
    plan = src.plan_source(f"hf://{repo}", subset="High-Quality")
    assert [p.kind for p in plan.pieces] == ["hub", "hub"]  # one piece per data file
    assert plan.description["revision"].startswith("local-")
    assert _texts(plan) == hq
    assert _texts(src.plan_source(f"hf://{repo}", subset="Low")) == low
    # The revision (recorded in metadata and the fingerprint) follows the files.
    before = plan.description["revision"]
    pq.write_table(pa.table({"text": low + ["one more"]}), repo / "low" / "part-00000.parquet")
    assert src.plan_source(f"hf://{repo}", subset="High-Quality").description["revision"] != before
    # A jsonl repository in the default data/ layout (no README configs).
    jsonl_repo = tmp_path / "jsonl-repo"
    write_jsonl(jsonl_repo / "data" / "train-00000.jsonl", low)
    write_jsonl(jsonl_repo / "data" / "train-00001.jsonl", hq)
    assert _texts(src.plan_source(f"hf://{jsonl_repo}")) == low + hq


def test_bad_records_are_classified_with_locations(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"text": "good one"}\n'
        b'{"text": "broken\n'
        b'{"other": "no text"}\n'
        b'{"text": "caf\xe9 latin-1"}\n'
        b'{"text": "   "}\n'
        b"\n"
        b'["not", "an", "object"]\n'
        b'{"text": null}\n'
        b'{"text": "good two"}\n'
    )
    records = list(src.iter_records(src.plan_source(str(path)).pieces[0], "text"))
    kinds = [(r.bad_kind, r.location[1]) for r in records]
    assert kinds == [
        (None, 1),
        (src.MALFORMED_JSON, 2),
        (src.MISSING_TEXT, 3),
        (src.NON_UTF8, 4),
        (src.EMPTY, 5),
        (src.MALFORMED_JSON, 7),
        (src.MISSING_TEXT, 8),
        (None, 9),
    ]
    # In a piece that starts mid-file the location is a byte offset, turned into a line later.
    pieces = src.plan_source(str(path), piece_bytes=40).pieces
    later = [r for p in pieces[1:] for r in src.iter_records(p, "text") if r.bad_kind]
    assert later and all(len(r.location) == 3 for r in later)
    lines = sorted(int(src.format_location(r.location).rsplit(":", 1)[1]) for r in later)
    assert set(lines) <= {2, 3, 4, 5, 7, 8}


def test_hostile_records_are_counted_with_their_line(tmp_path):
    # A line nested deeper than the JSON parser's recursion limit raised a bare RecursionError
    # that ended the prep naming neither file nor line; it is a malformed record like any other.
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "one"}\n' + "[" * 100_000 + "]" * 100_000 + '\n{"text": "two"}\n')
    records = list(src.iter_records(src.plan_source(str(path)).pieces[0], "text"))
    assert [(r.text, r.bad_kind, r.location) for r in records] == [
        ("one", None, (str(path), 1)),
        (None, src.MALFORMED_JSON, (str(path), 2)),
        ("two", None, (str(path), 3)),
    ]


def test_byte_order_mark_opening_a_file_is_not_part_of_the_first_record(tmp_path):
    # Before: the first record of a jsonl file saved with a BOM was counted as malformed JSON,
    # and a .txt document began with U+FEFF.
    docs = ["first doc", "second doc"]
    (tmp_path / "bom.jsonl").write_bytes(
        b"\xef\xbb\xbf" + "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    )
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfa text file")
    assert _texts(src.plan_source(str(tmp_path / "bom.jsonl"))) == docs
    assert _texts(src.plan_source(str(tmp_path / "bom.txt"))) == ["a text file"]
    # Only at the start of the file: a BOM inside a later line is that line's problem.
    (tmp_path / "mid.jsonl").write_bytes(b'{"text": "a"}\n\xef\xbb\xbf{"text": "b"}\n')
    kinds = [
        r.bad_kind for r in src.iter_records(src.plan_source(str(tmp_path / "mid.jsonl")).pieces[0], "text")
    ]
    assert kinds == [None, src.MALFORMED_JSON]


def test_corrupt_parquet_data_is_an_error_naming_the_file(tmp_path):
    # The footer is intact (the plan reads it), a data page is not: pyarrow's own error
    # ("OSError: Corrupt snappy compressed data.") named no file.
    path = tmp_path / "corrupt.parquet"
    pq.write_table(
        pa.table({"text": [f"document number {i}" for i in range(4000)]}), path, row_group_size=1000
    )
    raw = bytearray(path.read_bytes())
    raw[2000:6000] = b"A" * 4000
    path.write_bytes(bytes(raw))
    pieces = src.plan_source(str(path)).pieces
    with pytest.raises(src.SourceError, match=r"corrupt.parquet: unreadable at row \d+"):
        for piece in pieces:
            list(src.iter_records(piece, "text"))


@pytest.mark.parametrize("compression", ["gz", "zst"])
@pytest.mark.parametrize("cut", ["half", "last byte", "not compressed"])
def test_a_cut_or_foreign_compressed_file_is_an_error_naming_it(tmp_path, compression, cut):
    # zstandard's stream_reader ends quietly where a file is cut inside a frame: a .zst cut in
    # half read as a file of half the records, and the prep exited 0 with the tail lost.
    payload = "".join(json.dumps({"text": d}) + "\n" for d in make_docs(2000, seed=7)).encode()
    packed = gzip.compress(payload) if compression == "gz" else zstandard.ZstdCompressor().compress(payload)
    raw = {"half": packed[: len(packed) // 2], "last byte": packed[:-1], "not compressed": payload}[cut]
    path = tmp_path / f"c.jsonl.{compression}"
    path.write_bytes(raw)
    (piece,) = src.plan_source(str(path)).pieces
    with pytest.raises(src.SourceError, match=rf"c.jsonl.{compression}: unreadable after line \d+"):
        list(src.iter_records(piece, "text"))


def test_concatenated_zstd_frames_read_as_one_stream(tmp_path):
    # `cat a.zst b.zst > c.zst` is a valid zstd file: every frame's records, in order.
    first, second = make_docs(50, seed=8), make_docs(40, seed=9)
    frames = [
        zstandard.ZstdCompressor().compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
        for docs in (first, second)
    ]
    (tmp_path / "c.jsonl.zst").write_bytes(b"".join(frames))
    assert _texts(src.plan_source(str(tmp_path / "c.jsonl.zst"))) == first + second
    (tmp_path / "empty.jsonl.zst").write_bytes(b"")
    (piece,) = src.plan_source(str(tmp_path / "empty.jsonl.zst")).pieces
    assert list(src.iter_records(piece, "text")) == []


def test_source_errors_name_the_path(tmp_path):
    with pytest.raises(src.SourceError, match="not found"):
        src.plan_source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(src.SourceError, match="unsupported scheme"):
        src.plan_source("s3://bucket/x")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(src.SourceError, match="unsupported file type"):
        src.plan_source(str(tmp_path / "x.csv"))
    with pytest.raises(src.SourceError, match="matches no"):
        src.plan_source(str(tmp_path / "*.jsonl"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(src.SourceError, match="no column 'text'"):
        list(src.iter_records(src.plan_source(str(tmp_path / "p.parquet")).pieces[0], "text"))


def test_hub_repo_revision_is_pinned_to_a_commit_in_every_piece(tmp_path, monkeypatch):
    """The hub branch (org/name): the revision is resolved once and every read uses the commit."""
    import datasets
    import huggingface_hub

    hq = make_docs(6, seed=12)
    _hub_layout(tmp_path / "mirror", hq, hq[:2])
    commit = "0123456789abcdef0123456789abcdef01234567"
    asked, loads = [], []

    class Info:
        sha = commit

    def dataset_info(self, repo_id, revision=None, **kwargs):
        asked.append((repo_id, revision))
        return Info()

    real_load = datasets.load_dataset

    def load_dataset(path, name=None, split=None, streaming=False, revision=None, **kwargs):
        loads.append((path, name, revision))
        assert path == "nvidia/Fake-CC" and streaming
        return real_load(str(tmp_path / "mirror"), name=name, split=split, streaming=True)

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    plan = src.plan_source("hf://nvidia/Fake-CC", subset="High-Quality", revision="v1.0")
    assert asked == [("nvidia/Fake-CC", "v1.0")]
    assert plan.description["revision"] == commit and plan.description["requested_revision"] == "v1.0"
    assert _texts(plan) == hq
    assert {revision for _, _, revision in loads} == {commit}
    # A full commit is used as is, without asking the hub.
    src.plan_source("hf://nvidia/Fake-CC", subset="High-Quality", revision=commit)
    assert len(asked) == 1
