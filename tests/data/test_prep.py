import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prep_gate import finished, gated_env, wait_for_holds

from nemotron.data import prep as prep_module
from nemotron.data.config import DataPrepConfig, TokenizerConfig
from nemotron.data.indexed import shard_seal
from nemotron.data.prep import DataPrepError, run_data_prep

from .conftest import make_docs, write_jsonl
from .megatron_format import read_index, read_sequences


def _blend(root: Path, entries) -> Path:
    path = root / "data_blend_raw.json"
    path.write_text(json.dumps({"datasets": entries}))
    return path


def _cfg(root: Path, bpe_dir: Path, **overrides) -> DataPrepConfig:
    base = dict(
        blend_path="data_blend_raw.json",
        output_dir=str(root / "out"),
        tokenizer=TokenizerConfig(model=str(bpe_dir)),
        num_shards=4,
        num_workers=1,
        work_unit_mb=0.002,  # several work units even for tiny files
    )
    base.update(overrides)
    return DataPrepConfig(**base)


def _encode(bpe_dir, docs):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    eos = raw.token_to_id("</s>")
    return [raw.encode(d, add_special_tokens=False).ids + [eos] for d in docs]


def _prefixes(out: Path, split: str, dataset: str) -> list[Path]:
    return sorted(p.with_suffix("") for p in (out / split).glob(f"{dataset}_*.idx"))


def _output_bytes(out: Path) -> dict[str, bytes]:
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.name != "metadata.json":
            data = path.read_bytes()
            if path.name == "blend.json":
                data = data.replace(str(out).encode(), b"OUT")
            files[str(path.relative_to(out))] = data
    return files


@pytest.fixture()
def corpus(tmp_path):
    docs_a = make_docs(120, seed=10, prefix="A ")
    docs_b = make_docs(40, seed=11, prefix="B ")
    write_jsonl(tmp_path / "a.jsonl", docs_a)
    pq.write_table(pa.table({"text": docs_b}), tmp_path / "b.parquet", row_group_size=7)
    _blend(
        tmp_path,
        [{"name": "a", "path": "a.jsonl", "weight": 1.0}, {"name": "b", "path": "b.parquet", "weight": 3.0}],
    )
    return {"a": docs_a, "b": docs_b}


def test_every_token_of_a_known_corpus(tmp_path, bpe_dir, corpus):
    result = run_data_prep(_cfg(tmp_path, bpe_dir), recipe_dir=tmp_path)
    out = tmp_path / "out"
    assert not result.cached
    assert not (out / ".work").exists()
    for name, docs in corpus.items():
        expected = _encode(bpe_dir, docs)
        got = {
            split: [seq for p in _prefixes(out, split, name) for seq in read_sequences(p)]
            for split in ("train", "valid", "test")
        }
        # Every document appears exactly once across the splits, token for token...
        assert sorted(map(tuple, got["train"] + got["valid"] + got["test"])) == sorted(map(tuple, expected))
        # ...train keeps the source order, and valid/test hold documents of every dataset.
        train_positions = [expected.index(seq) for seq in got["train"]]
        assert train_positions == sorted(train_positions)
        assert got["valid"] and got["test"]
        for prefix in _prefixes(out, "train", name):
            index = read_index(prefix)
            assert index["code"] == 8  # uint16 for a 400-token vocabulary
            assert index["documents"] == list(range(len(index["lengths"]) + 1))
        assert len(_prefixes(out, "train", name)) == 4
    blend = json.loads((out / "blend.json").read_text())
    assert set(blend) == {"train", "valid", "test"}
    for split, items in blend.items():
        for prefix in items[1::2]:
            assert Path(prefix).is_absolute() and Path(prefix + ".idx").is_file()
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["type"] == "DataBlendsArtifact-pretrain"
    assert metadata["tokenizer"]["vocab_size"] == 400
    assert metadata["fingerprint"] == result.fingerprint
    assert [s["rows"] for s in metadata["sources"]] == [120, 40]
    assert metadata["producer"]["name"] == "nemotron"
    rows = {(r.dataset, r.split): r for r in result.summary}
    assert rows[("a", "train")].files == 4
    assert rows[("a", "train")].share == pytest.approx(0.25)
    assert result.totals("train")[0] + result.totals("valid")[0] + result.totals("test")[0] == 160


def _megatron_blend_counts(weights, num_samples):
    """Megatron's deterministic blending (docs/reference.md §4): sample i -> argmax w_d * max(i,1) - drawn_d."""
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    drawn = np.zeros(len(weights))
    for i in range(num_samples):
        d = int(np.argmax(weights * max(i, 1) - drawn))
        drawn[d] += 1
    return drawn


def test_token_shares_follow_weights_regardless_of_shard_count(tmp_path, bpe_dir):
    big, small = make_docs(400, seed=12, prefix="BIG "), make_docs(10, seed=13, prefix="SMALL ")
    write_jsonl(tmp_path / "big.jsonl", big)
    write_jsonl(tmp_path / "small.jsonl", small)
    _blend(
        tmp_path,
        [
            {"name": "big", "path": "big.jsonl", "weight": 1.0},
            {"name": "small", "path": "small.jsonl", "weight": 3.0},
        ],
    )
    result = run_data_prep(_cfg(tmp_path, bpe_dir, num_shards=16), recipe_dir=tmp_path)
    rows = {(r.dataset, r.split): r for r in result.summary}
    assert rows[("big", "train")].files == 16
    blend = json.loads((tmp_path / "out" / "blend.json").read_text())["train"]
    weights, prefixes = [float(w) for w in blend[::2]], blend[1::2]
    counts = _megatron_blend_counts(weights, 5000)
    share_small = sum(c for c, p in zip(counts, prefixes) if "/small_" in p) / counts.sum()
    assert share_small == pytest.approx(0.75, abs=0.01)
    # The public recipe's rule (every shard carries the dataset weight) would not.
    naive = [1.0 if "/big_" in p else 3.0 for p in prefixes]
    naive_counts = _megatron_blend_counts(naive, 5000)
    naive_small = sum(c for c, p in zip(naive_counts, prefixes) if "/small_" in p) / naive_counts.sum()
    assert abs(naive_small - 0.75) > 0.05


def test_valid_and_test_cover_every_dataset(tmp_path, bpe_dir):
    entries = []
    for k in range(3):
        write_jsonl(tmp_path / f"d{k}.jsonl", make_docs(25, seed=20 + k, prefix=f"D{k} "))
        entries.append({"name": f"d{k}", "path": f"d{k}.jsonl", "weight": 1.0 + k})
    _blend(tmp_path, entries)
    run_data_prep(_cfg(tmp_path, bpe_dir, valid_fraction=0.1, test_fraction=0.1), recipe_dir=tmp_path)
    blend = json.loads((tmp_path / "out" / "blend.json").read_text())
    for split in ("valid", "test"):
        names = {Path(p).name.rsplit("_", 1)[0] for p in blend[split][1::2]}
        assert names == {"d0", "d1", "d2"}, split
        weights = dict(
            zip([Path(p).name.rsplit("_", 1)[0] for p in blend[split][1::2]], map(float, blend[split][::2]))
        )
        assert weights["d2"] == pytest.approx(0.5)


def test_same_bytes_with_any_number_of_workers(tmp_path, bpe_dir, corpus):
    one = run_data_prep(_cfg(tmp_path, bpe_dir, output_dir=str(tmp_path / "one")), recipe_dir=tmp_path)
    two = run_data_prep(
        _cfg(tmp_path, bpe_dir, output_dir=str(tmp_path / "two"), num_workers=2), recipe_dir=tmp_path
    )
    assert one.fingerprint == two.fingerprint
    first, second = _output_bytes(tmp_path / "one"), _output_bytes(tmp_path / "two")
    assert {k: v.replace(b"/one", b"") for k, v in first.items()} == {
        k: v.replace(b"/two", b"") for k, v in second.items()
    }


def test_cache_noop_change_detection_and_force(tmp_path, bpe_dir, corpus):
    cfg = _cfg(tmp_path, bpe_dir)
    first = run_data_prep(cfg, recipe_dir=tmp_path)
    out = tmp_path / "out"
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    events = []
    again = run_data_prep(cfg, recipe_dir=tmp_path, progress=events.append)
    assert again.cached and again.fingerprint == first.fingerprint
    assert "nothing to do" in events[-1].message
    assert stamp == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert again.summary == first.summary

    forced = run_data_prep(dataclasses.replace(cfg, force=True), recipe_dir=tmp_path)
    assert not forced.cached and forced.fingerprint == first.fingerprint
    assert any(stamp[p] != p.stat().st_mtime_ns for p in stamp if p.suffix == ".bin")

    # A changed source, tokenizer setting or prep setting is a new fingerprint and a rebuild.
    with open(tmp_path / "a.jsonl", "a") as handle:
        handle.write(json.dumps({"text": "a brand new document"}) + "\n")
    changed = run_data_prep(cfg, recipe_dir=tmp_path)
    assert not changed.cached and changed.fingerprint != first.fingerprint
    bos = run_data_prep(
        dataclasses.replace(cfg, tokenizer=TokenizerConfig(model=str(bpe_dir), add_bos=True)),
        recipe_dir=tmp_path,
    )
    assert not bos.cached and bos.fingerprint != changed.fingerprint
    run_data_prep(dataclasses.replace(cfg, num_shards=2), recipe_dir=tmp_path)
    assert len(_prefixes(out, "train", "a")) == 2  # no stale shards of the older build remain


def test_each_shard_is_sealed_and_a_changed_build_is_rebuilt_not_up_to_date(tmp_path, bpe_dir, corpus):
    cfg = _cfg(tmp_path, bpe_dir)
    first = run_data_prep(cfg, recipe_dir=tmp_path)
    out = tmp_path / "out"
    metadata = json.loads((out / "metadata.json").read_text())
    entries = [entry for split in ("train", "valid", "test") for entry in metadata["splits"][split]]
    assert len(entries) == len(list(out.rglob("*.idx")))
    for entry in entries:
        assert entry["seal"] == shard_seal(entry["prefix"]), entry["prefix"]
    built = _output_bytes(out)

    # Two shards exchanged whole (both files renamed): each pair is a valid index of its .bin.
    a, b = _prefixes(out, "train", "a")[:2]
    for suffix in (".bin", ".idx"):
        os.replace(f"{a}{suffix}", tmp_path / "x")
        os.replace(f"{b}{suffix}", f"{a}{suffix}")
        os.replace(tmp_path / "x", f"{b}{suffix}")
    events = []
    again = run_data_prep(cfg, recipe_dir=tmp_path, progress=events.append)
    assert not again.cached and again.fingerprint == first.fingerprint
    assert "nothing to do" not in events[-1].message
    assert _output_bytes(out) == built

    # A truncated .bin (same names, a shorter file) is rebuilt too.
    Path(f"{a}.bin").write_bytes(Path(f"{a}.bin").read_bytes()[:-2])
    assert not run_data_prep(cfg, recipe_dir=tmp_path).cached
    assert _output_bytes(out) == built
    assert run_data_prep(cfg, recipe_dir=tmp_path).cached

    # A record that is not one (a damaged seal, splits of another shape) is rebuilt, not trusted.
    for damage in ({"seal": "x"}, {"seal": {"idx_bytes": "1"}}):
        metadata = json.loads((out / "metadata.json").read_text())
        metadata["splits"]["train"][0].update(damage)
        (out / "metadata.json").write_text(json.dumps(metadata))
        assert not run_data_prep(cfg, recipe_dir=tmp_path).cached, damage
    metadata = json.loads((out / "metadata.json").read_text())
    (out / "metadata.json").write_text(json.dumps(metadata | {"splits": [1, 2]}))
    assert not run_data_prep(cfg, recipe_dir=tmp_path).cached
    assert _output_bytes(out) == built and run_data_prep(cfg, recipe_dir=tmp_path).cached


def test_a_record_of_wrong_types_is_rebuilt_not_reported(tmp_path, bpe_dir, corpus):
    # A cached run reports the recorded summary: a record edited by hand ("many" documents, a
    # share of None, bad_records not a mapping) drew a traceback from the summary table after
    # the job was marked completed; one nested too deeply raised RecursionError.
    cfg = _cfg(tmp_path, bpe_dir)
    run_data_prep(cfg, recipe_dir=tmp_path)
    out = tmp_path / "out"
    built = _output_bytes(out)
    good = json.loads((out / "metadata.json").read_text())
    damages = {
        "documents": lambda m: m["summary"][0].update(documents="many"),
        "share": lambda m: m["summary"][0].update(share=None),
        "split": lambda m: m["summary"][0].update(split=3),
        "bad_records": lambda m: m["sources"][0].update(bad_records="lots"),
        "bad_count": lambda m: m["sources"][0]["bad_records"].update(malformed_json=-1),
        "bad_locations": lambda m: m["sources"][0].update(bad_locations=[1]),
    }
    for name, damage in damages.items():
        metadata = json.loads(json.dumps(good))
        damage(metadata)
        (out / "metadata.json").write_text(json.dumps(metadata))
        rebuilt = run_data_prep(cfg, recipe_dir=tmp_path)
        assert not rebuilt.cached, name
        assert json.loads((out / "metadata.json").read_text())["summary"] == good["summary"], name
    (out / "metadata.json").write_text("[" * 100_000 + "]" * 100_000)
    assert not run_data_prep(cfg, recipe_dir=tmp_path).cached
    assert _output_bytes(out) == built and run_data_prep(cfg, recipe_dir=tmp_path).cached


def test_sample_and_filters(tmp_path, bpe_dir, corpus):
    sampled = run_data_prep(_cfg(tmp_path, bpe_dir, sample=10), recipe_dir=tmp_path)
    metadata = json.loads(sampled.metadata_path.read_text())
    assert [s["rows"] for s in metadata["sources"]] == [10, 10]
    total_docs = sum(r.documents for r in sampled.summary if r.dataset == "a")
    assert total_docs == 10
    out = tmp_path / "out"
    train_a = [seq for p in _prefixes(out, "train", "a") for seq in read_sequences(p)]
    first_ten = _encode(bpe_dir, corpus["a"][:10])
    assert all(seq in first_ten for seq in train_a)

    min_chars = 150
    filtered = run_data_prep(_cfg(tmp_path, bpe_dir, min_doc_chars=min_chars), recipe_dir=tmp_path)
    kept = [d for d in corpus["a"] if len(d) >= min_chars]
    assert sum(r.documents for r in filtered.summary if r.dataset == "a") == len(kept)
    meta = json.loads(filtered.metadata_path.read_text())
    assert meta["sources"][0]["filtered"]["min_doc_chars"] == len(corpus["a"]) - len(kept)

    max_tokens = 12
    capped = run_data_prep(_cfg(tmp_path, bpe_dir, max_doc_tokens=max_tokens), recipe_dir=tmp_path)
    lengths = [len(t) for t in _encode(bpe_dir, corpus["a"])]
    assert sum(r.documents for r in capped.summary if r.dataset == "a") == sum(
        n <= max_tokens for n in lengths
    )
    for split in ("train", "valid", "test"):
        for prefix in _prefixes(out, split, "a"):
            assert max(read_index(prefix)["lengths"]) <= max_tokens


def _bad_corpus(path: Path, good: list[str]) -> None:
    lines = [json.dumps({"text": d}).encode() for d in good]
    lines[3] = b'{"text": "unterminated'
    lines[7] = b'{"body": "no text field"}'
    lines[11] = b'{"text": "bad byte \xff here"}'
    lines[15] = b'{"text": ""}'
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_bad_records_skipped_counted_and_located(tmp_path, bpe_dir):
    good = make_docs(60, seed=30)
    _bad_corpus(tmp_path / "bad.jsonl", good)
    write_jsonl(tmp_path / "ok.jsonl", make_docs(20, seed=31))
    _blend(
        tmp_path,
        [{"name": "bad", "path": "bad.jsonl", "weight": 1}, {"name": "ok", "path": "ok.jsonl", "weight": 1}],
    )
    result = run_data_prep(_cfg(tmp_path, bpe_dir, max_bad_record_fraction=0.1), recipe_dir=tmp_path)
    assert result.bad_records["bad"] == {
        "malformed_json": 1,
        "missing_text_field": 1,
        "non_utf8": 1,
        "empty_document": 1,
    }
    assert result.bad_records["ok"] == {k: 0 for k in result.bad_records["bad"]}
    bad_file = str(tmp_path / "bad.jsonl")
    assert result.bad_locations["bad"] == [
        f"{bad_file}:4 (malformed_json)",
        f"{bad_file}:8 (missing_text_field)",
        f"{bad_file}:12 (non_utf8)",
        f"{bad_file}:16 (empty_document)",
    ]
    assert sum(r.documents for r in result.summary if r.dataset == "bad") == 56

    with pytest.raises(DataPrepError, match=r"dataset 'bad' \(bad.jsonl\): 4 of 60 records are bad") as info:
        run_data_prep(_cfg(tmp_path, bpe_dir, max_bad_record_fraction=0.05), recipe_dir=tmp_path)
    assert f"{bad_file}:4" in str(info.value)


def test_source_without_documents_is_an_error(tmp_path, bpe_dir):
    write_jsonl(tmp_path / "ok.jsonl", make_docs(20, seed=32))
    (tmp_path / "empty.jsonl").write_text("")
    _blend(
        tmp_path,
        [
            {"name": "ok", "path": "ok.jsonl", "weight": 1},
            {"name": "hollow", "path": "empty.jsonl", "weight": 1},
        ],
    )
    with pytest.raises(DataPrepError, match=r"dataset 'hollow' \(empty.jsonl\) yielded no records"):
        run_data_prep(_cfg(tmp_path, bpe_dir), recipe_dir=tmp_path)
    write_jsonl(tmp_path / "empty.jsonl", ["x", "y"])
    with pytest.raises(DataPrepError, match=r"dataset 'hollow' .* yielded no documents .* 2 filtered"):
        run_data_prep(_cfg(tmp_path, bpe_dir, min_doc_chars=5), recipe_dir=tmp_path)


def test_hub_layout_and_sentencepiece_end_to_end(tmp_path, sp_model):
    from .test_sources import _hub_layout

    hq, low = make_docs(30, seed=40, prefix="HQ "), make_docs(10, seed=41, prefix="LOW ")
    _hub_layout(tmp_path / "repo", hq, low)
    _blend(
        tmp_path,
        [
            {"name": "hq", "path": f"hf://{tmp_path / 'repo'}", "subset": "High-Quality", "weight": 2},
            {"name": "low", "path": f"hf://{tmp_path / 'repo'}", "subset": "Low", "weight": 1},
        ],
    )
    cfg = DataPrepConfig(
        blend_path=str(tmp_path / "data_blend_raw.json"),
        output_dir=str(tmp_path / "out"),
        tokenizer=TokenizerConfig(model=str(sp_model)),
        num_shards=2,
        num_workers=1,
    )
    result = run_data_prep(cfg)
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    expected = sorted(tuple(sp.encode(d) + [2]) for d in hq)
    got = sorted(
        tuple(s)
        for split in ("train", "valid", "test")
        for p in _prefixes(tmp_path / "out", split, "hq")
        for s in read_sequences(p)
    )
    assert got == expected
    metadata = json.loads(result.metadata_path.read_text())
    assert metadata["sources"][0]["revision"].startswith("local-")
    assert metadata["tokenizer"]["kind"] == "sentencepiece"


def test_interrupted_assembly_resumes_to_identical_output(tmp_path, bpe_dir, corpus, monkeypatch):
    clean = run_data_prep(_cfg(tmp_path, bpe_dir, output_dir=str(tmp_path / "clean")), recipe_dir=tmp_path)
    real_write = prep_module._write_shard
    calls = {"n": 0}

    def dying_write(plan, dtype):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # stands in for a kill between two shard files
        real_write(plan, dtype)

    monkeypatch.setattr(prep_module, "_write_shard", dying_write)
    cfg = _cfg(tmp_path, bpe_dir, output_dir=str(tmp_path / "resumed"))
    with pytest.raises(KeyboardInterrupt):
        run_data_prep(cfg, recipe_dir=tmp_path)
    assert not (tmp_path / "resumed" / "metadata.json").exists()
    monkeypatch.setattr(prep_module, "_write_shard", real_write)
    resumed = run_data_prep(cfg, recipe_dir=tmp_path)
    assert resumed.units_reused > 0 and not resumed.cached
    strip = lambda files, name: {k: v.replace(f"/{name}".encode(), b"") for k, v in files.items()}  # noqa: E731
    assert strip(_output_bytes(tmp_path / "clean"), "clean") == strip(
        _output_bytes(tmp_path / "resumed"), "resumed"
    )
    assert clean.summary == resumed.summary


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from nemotron.data.config import DataPrepConfig, TokenizerConfig
    from nemotron.data.prep import run_data_prep

    if __name__ == "__main__":
        root, out, tokenizer = sys.argv[1:4]
        cfg = DataPrepConfig(blend_path=root + "/data_blend_raw.json", output_dir=out,
                             tokenizer=TokenizerConfig(model=tokenizer), num_shards=3,
                             num_workers=2, work_unit_mb=0.05)
        run_data_prep(cfg)
    """
)


def test_kill_minus_nine_then_rerun_gives_identical_bytes(tmp_path, bpe_dir):
    docs = make_docs(12000, seed=50)
    write_jsonl(tmp_path / "big.jsonl", docs)
    write_jsonl(tmp_path / "small.jsonl", make_docs(300, seed=51))
    _blend(
        tmp_path,
        [
            {"name": "big", "path": "big.jsonl", "weight": 1},
            {"name": "small", "path": "small.jsonl", "weight": 1},
        ],
    )
    script = tmp_path / "prep_job.py"
    script.write_text(KILL_SCRIPT)
    killed_out = tmp_path / "killed"
    command = [sys.executable, str(script), str(tmp_path), str(killed_out), str(bpe_dir)]
    # The job's 2 workers finish one unit between them, then each holds the next unit it starts
    # (the gate stops it there): the kill comes mid-way whatever the timing, with units in flight.
    gate = tmp_path / "gate-1"
    process = subprocess.Popen(
        command, start_new_session=True, stderr=subprocess.PIPE, env=gated_env(gate, 0, allow="0:1")
    )

    def running() -> None:
        if process.poll() is not None:
            pytest.fail(f"the job ended before the gate: {process.stderr.read().decode()[-3000:]}")

    try:
        holds = wait_for_holds(gate, {0: 2}, running, timeout_s=120)
    finally:
        with contextlib.suppress(ProcessLookupError):  # (gone if it ended before the gate)
            os.killpg(process.pid, signal.SIGKILL)  # the job and its worker processes
        process.communicate()
    assert len({record["pid"] for record in holds[0]}) == 2  # one unit held by each worker
    assert not (killed_out / "metadata.json").exists()
    (work,) = [p for p in (killed_out / ".work").iterdir() if (p / "plan.json").is_file()]
    units = [unit["unit_id"] for unit in json.loads((work / "plan.json").read_text())["units"]]
    markers = {p.name.removesuffix(".done.json") for p in (work / "units").glob("*.done.json")}
    assert [markers] == [set(ids) for ids in finished(gate).values()] and len(markers) == 1
    assert not markers & {record["unit"] for record in holds[0]}

    # The rerun does every other unit once (the held ones included) and reuses the finished one.
    rerun_gate = tmp_path / "gate-2"
    rerun = subprocess.run(command, capture_output=True, text=True, env=gated_env(rerun_gate, 0))
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(finished(rerun_gate)[0]) == sorted(set(units) - markers)
    cfg = DataPrepConfig(
        blend_path=str(tmp_path / "data_blend_raw.json"),
        output_dir=str(tmp_path / "clean"),
        tokenizer=TokenizerConfig(model=str(bpe_dir)),
        num_shards=3,
        num_workers=1,
    )
    run_data_prep(cfg)
    strip = lambda files, name: {k: v.replace(f"/{name}".encode(), b"") for k, v in files.items()}  # noqa: E731
    assert strip(_output_bytes(killed_out), "killed") == strip(_output_bytes(tmp_path / "clean"), "clean")


def _gone(pid: int) -> bool:
    """The process has exited (a zombie no one reaps counts: it runs nothing, holds no file)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_workers_end_when_the_prep_is_killed_alone(tmp_path, bpe_dir):
    """kill -9 of the prep process only (not its process group: what `kill -9 PID`, or a
    launcher killing its child, does) while its 2 workers are each in a unit: the workers end
    too. They waited for ever on their task queue, keeping the forkserver and the prep's
    stderr pipe alive: the caller's read of that pipe (here `communicate`) never returned."""
    write_jsonl(tmp_path / "big.jsonl", make_docs(3000, seed=52))
    _blend(tmp_path, [{"name": "big", "path": "big.jsonl", "weight": 1}])
    script = tmp_path / "prep_job.py"
    script.write_text(KILL_SCRIPT)
    command = [sys.executable, str(script), str(tmp_path), str(tmp_path / "out"), str(bpe_dir)]
    gate = tmp_path / "gate"
    process = subprocess.Popen(
        command, start_new_session=True, stderr=subprocess.PIPE, env=gated_env(gate, 0, allow="0:0")
    )

    def running() -> None:
        if process.poll() is not None:
            pytest.fail(f"the job ended before the gate: {process.stderr.read().decode()[-3000:]}")

    try:
        holds = wait_for_holds(gate, {0: 2}, running, timeout_s=120)
        os.kill(process.pid, signal.SIGKILL)  # the prep alone; its workers hold a unit each
        process.communicate(timeout=30)  # returns once every holder of its stderr has exited
        workers = {record["pid"] for record in holds[0]}
        assert len(workers) == 2 and all(_gone(pid) for pid in workers)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_progress_reports_phases_and_counts(tmp_path, bpe_dir, corpus):
    events = []
    result = run_data_prep(_cfg(tmp_path, bpe_dir), recipe_dir=tmp_path, progress=events.append)
    phases = [e.phase for e in events]
    assert phases[0] == "plan" and phases[-1] == "done" and "tokenize" in phases and "assemble" in phases
    tokens = [e.tokens for e in events]
    assert tokens == sorted(tokens)
    assert events[-1].tokens == sum(r.tokens for r in result.summary)
    assert events[-1].documents == 160
    assert events[-1].units_done == events[-1].units_total > 1


def test_config_and_source_errors_name_the_problem(tmp_path, bpe_dir, corpus):
    with pytest.raises(DataPrepError, match="num_shards must be a positive integer"):
        run_data_prep(_cfg(tmp_path, bpe_dir, num_shards=0), recipe_dir=tmp_path)
    with pytest.raises(DataPrepError, match=r"valid_fraction \+ test_fraction"):
        run_data_prep(_cfg(tmp_path, bpe_dir, valid_fraction=0.6, test_fraction=0.5), recipe_dir=tmp_path)
    _blend(tmp_path, [{"name": "b", "path": "b.parquet", "weight": 1, "text_field": "body"}])
    with pytest.raises(DataPrepError, match=r"dataset 'b': .*b.parquet: no column 'body'"):
        run_data_prep(_cfg(tmp_path, bpe_dir), recipe_dir=tmp_path)
    _blend(tmp_path, [{"name": "gone", "path": "nowhere/*.jsonl", "weight": 1}])
    with pytest.raises(
        DataPrepError, match=r"data_blend_raw.json: dataset 'gone': glob 'nowhere/\*.jsonl' matches no"
    ):
        run_data_prep(_cfg(tmp_path, bpe_dir), recipe_dir=tmp_path)


def test_a_shard_count_whose_arithmetic_would_wrap_around_is_refused(tmp_path, bpe_dir, corpus):
    """A document's shard is tokens_before * num_shards // tokens in int64: a count that makes
    the product pass 2**63 would wrap around and put documents in the wrong shards silently
    (a count past 64 bits failed as a bare OverflowError)."""
    with pytest.raises(DataPrepError, match=r"data prep config: num_shards 4611686018427387904 is too many"):
        run_data_prep(_cfg(tmp_path, bpe_dir, num_shards=2**62), recipe_dir=tmp_path)
    assert not (tmp_path / "out" / "blend.json").exists()


def test_lone_surrogate_counts_as_non_utf8(tmp_path, bpe_dir):
    docs = make_docs(30, seed=60)
    path = write_jsonl(tmp_path / "s.jsonl", docs)
    with open(path, "a") as handle:
        handle.write('{"text": "broken \\ud800 surrogate"}\n')
    _blend(tmp_path, [{"name": "s", "path": "s.jsonl", "weight": 1}])
    result = run_data_prep(_cfg(tmp_path, bpe_dir, max_bad_record_fraction=0.5), recipe_dir=tmp_path)
    assert result.bad_records["s"]["non_utf8"] == 1
    assert result.bad_locations["s"] == [f"{path}:31 (non_utf8)"]


def test_recorded_chars_are_characters_as_min_doc_chars_counts_them(tmp_path, bpe_dir):
    # `chars` summed UTF-8 bytes (len(text.encode())), while the filter beside it counts
    # characters: a non-ASCII corpus read as longer than it is.
    docs = ["café au lait " * 3, "naïve résumé", "plain ascii text here", "日本語のテキスト"]
    write_jsonl(tmp_path / "u.jsonl", docs)
    _blend(tmp_path, [{"name": "u", "path": "u.jsonl", "weight": 1.0}])
    result = run_data_prep(_cfg(tmp_path, bpe_dir, num_shards=1, min_doc_chars=10), recipe_dir=tmp_path)
    (source,) = json.loads(result.metadata_path.read_text())["sources"]
    kept = [d for d in docs if len(d) >= 10]
    assert source["filtered"]["min_doc_chars"] == len(docs) - len(kept) == 1
    assert source["chars"] == sum(len(d) for d in kept) < sum(len(d.encode()) for d in kept)
