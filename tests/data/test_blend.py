import json

import pytest

from nemotron.data.blend import (
    BlendError,
    ShardWeight,
    load_blend,
    parse_blend,
    shard_weights,
    write_split_blend,
)


def _write(tmp_path, datasets, **top):
    path = tmp_path / "data_blend_raw.json"
    path.write_text(json.dumps({"datasets": datasets, **top}))
    return path


GOOD = {"name": "cc", "path": "hf://nvidia/Nemotron-CC-v2.1", "subset": "High-Quality", "weight": 1.0}


def test_valid_blend_parses(tmp_path):
    blend = load_blend(
        _write(
            tmp_path,
            [
                GOOD,
                {
                    "name": "code",
                    "path": "code/*.jsonl",
                    "weight": 3,
                    "text_field": "content",
                    "split": {"valid": 0.01},
                    "min_doc_chars": 5,
                },
            ],
        )
    )
    assert [e.name for e in blend] == ["cc", "code"]
    assert blend.entries[1].text_field == "content"
    assert blend.entries[1].valid_fraction == 0.01 and blend.entries[1].test_fraction == 0.0
    assert blend.normalised_weights == {"cc": 0.25, "code": 0.75}


@pytest.mark.parametrize(
    "entry,pattern",
    [
        ({"name": "x", "weight": 1}, r"datasets\[1\] \('x'\): missing required field 'path'"),
        ({"name": "x", "path": "p", "weight": 0}, r"datasets\[1\] \('x'\): field 'weight' must be > 0"),
        ({"name": "x", "path": "p", "weight": -2}, r"field 'weight' must be > 0"),
        ({"name": "x", "path": "p", "weight": "1.0"}, r"field 'weight' must be a number"),
        ({"name": "x", "path": "p", "weight": True}, r"field 'weight' must be a number"),
        ({"name": "x", "path": "p", "weight": float("nan")}, r"field 'weight' must be finite"),
        (
            {"name": "cc", "path": "p", "weight": 1},
            r"datasets\[1\] \('cc'\): duplicate name 'cc' \(also datasets\[0\]\)",
        ),
        (
            {"name": "x", "path": "p", "weight": 1, "wieght": 2},
            r"unknown key 'wieght' \(did you mean 'weight'\?\)",
        ),
        ({"name": "a b", "path": "p", "weight": 1}, r"field 'name' must use only"),
        ({"name": "x", "path": "", "weight": 1}, r"field 'path' must be a non-empty string"),
        ({"name": "x", "path": "a\0b", "weight": 1}, r"field 'path' must not contain a NUL character"),
        (
            {"name": "x", "path": "p", "weight": 1, "split": {"valid": 0.6, "test": 0.5}},
            r"leaves no training",
        ),
        ({"name": "x", "path": "p", "weight": 1, "split": {"dev": 0.1}}, r"unknown key 'dev'"),
        (
            {"name": "x", "path": "p", "weight": 1, "max_doc_tokens": 1.5},
            r"'max_doc_tokens' must be an integer",
        ),
        ("not an object", r"datasets\[1\]: each entry must be an object"),
        # a local file has no subset, revision or split: before, ignored (all of it prepared)
        (
            {"name": "x", "path": "p.jsonl", "weight": 1, "subset": "High-Quality"},
            r"datasets\[1\] \('x'\): field 'subset' applies to hf:// datasets only, not to 'p.jsonl'",
        ),
        ({"name": "x", "path": "p", "weight": 1, "revision": "v1"}, r"field 'revision' applies to hf://"),
        (
            {"name": "x", "path": "embedded://stdlib-code", "weight": 1, "hf_split": "test"},
            r"'hf_split' applies",
        ),
    ],
)
def test_validation_errors_name_file_entry_and_field(tmp_path, entry, pattern):
    path = _write(tmp_path, [GOOD, entry])
    with pytest.raises(BlendError, match=pattern) as info:
        load_blend(path)
    assert str(path) in str(info.value)


def test_file_level_errors(tmp_path):
    with pytest.raises(BlendError, match="not found"):
        load_blend(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"datasets": [')
    with pytest.raises(BlendError, match=r"bad.json: invalid JSON at line 1"):
        load_blend(bad)
    with pytest.raises(BlendError, match="unknown top-level key 'dataset'"):
        load_blend(_write(tmp_path, [GOOD], dataset=[]))
    with pytest.raises(BlendError, match="non-empty list"):
        parse_blend({"datasets": []}, "b.json")


def test_unreadable_blend_files_are_one_error_naming_them(tmp_path):
    # Before: a bare UnicodeDecodeError (no file named) and IsADirectoryError.
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"datasets": [\n {"name": "caf\xe9"}]}')
    with pytest.raises(BlendError, match=r"latin.json: not UTF-8 text at line 2"):
        load_blend(latin)
    (tmp_path / "dir").mkdir()
    with pytest.raises(BlendError, match=r"dir: is a directory, not a blend file"):
        load_blend(tmp_path / "dir")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BlendError, match=r"deep.json: invalid JSON"):
        load_blend(deep)
    # A byte-order mark is not content.
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"datasets": [GOOD]}).encode())
    assert [e.name for e in load_blend(bom)] == [GOOD["name"]]


def test_weights_summing_to_infinity_are_refused(tmp_path):
    # Each weight is finite, their sum is not: every share would normalise to 0, and prep
    # failed with a ZeroDivisionError after tokenizing the whole input.
    huge = [dict(GOOD, name="a", weight=1e308), dict(GOOD, name="b", weight=1e308)]
    with pytest.raises(BlendError, match=r"weights sum to inf: scale them down") as info:
        load_blend(_write(tmp_path, huge))
    assert str(tmp_path) in str(info.value)


def test_shard_weights_follow_dataset_weight_not_shard_count():
    shards = [ShardWeight("a", f"a_{i}", 100) for i in range(128)] + [ShardWeight("b", "b_0", 50)]
    weighted = shard_weights({"a": 0.5, "b": 0.5}, shards)
    share_a = sum(w.weight for w in weighted if w.dataset == "a")
    assert share_a == pytest.approx(0.5)
    assert sum(w.weight for w in weighted) == pytest.approx(1.0)
    # Within a dataset, shards are drawn in proportion to their tokens.
    uneven = shard_weights(
        {"a": 1.0}, [ShardWeight("a", "a_0", 300), ShardWeight("a", "a_1", 100), ShardWeight("a", "a_2", 0)]
    )
    assert [w.weight for w in uneven] == pytest.approx([0.75, 0.25])


def test_split_blend_file_format(tmp_path):
    path = write_split_blend(
        tmp_path / "blend.json",
        {
            "train": [
                ShardWeight("a", "/x/train/a_00000", 10, 0.25),
                ShardWeight("b", "/x/train/b_00000", 5, 0.75),
            ],
            "valid": [ShardWeight("a", "/x/valid/a_00000", 1, 1.0)],
        },
    )
    data = json.loads(path.read_text())
    assert data == {
        "train": ["0.25", "/x/train/a_00000", "0.75", "/x/train/b_00000"],
        "valid": ["1.0", "/x/valid/a_00000"],
        "test": [],
    }
    assert [p.name for p in tmp_path.iterdir()] == ["blend.json"]


def test_shipped_nano3_blends_are_valid():
    from importlib import resources

    directory = resources.files("nemotron") / "recipes" / "nano3" / "stage0_pretrain" / "config" / "data_prep"
    phase1 = load_blend(directory / "data_blend_raw.json")
    phase2 = load_blend(directory / "data_blend_phase2.json")
    families = {e.path for e in phase1}
    assert {
        "hf://nvidia/Nemotron-CC-v2.1",
        "hf://nvidia/Nemotron-CC-Math-v1",
        "hf://nvidia/Nemotron-Pretraining-Specialized-v1",
        "hf://nvidia/Nemotron-CC-Code-v1",
    } <= families
    # Phase 2 upweights the specialised STEM data relative to phase 1.
    share = lambda blend: sum(w for n, w in blend.normalised_weights.items() if "pretraining" in n)  # noqa: E731
    assert share(phase2) > share(phase1)


def test_numbers_past_a_floats_range_or_the_parsers_limit_are_named(tmp_path):
    # A weight of 401 digits raised a bare OverflowError (math.isfinite), one of 5,000 digits
    # a ValueError from Python's integer-parsing limit: neither named the file or the field.
    path = tmp_path / "big.json"
    path.write_text('{"datasets": [{"name": "a", "path": "p", "weight": 1' + "0" * 400 + "}]}")
    with pytest.raises(
        BlendError,
        match=r"big.json: datasets\[0\] \('a'\): field 'weight' must be finite, got an integer of 401 digits",
    ):
        load_blend(path)
    path.write_text('{"datasets": [{"name": "a", "path": "p", "weight": 1' + "0" * 5000 + "}]}")
    with pytest.raises(BlendError, match=r"big.json: invalid JSON \(Exceeds the limit"):
        load_blend(path)


def test_a_share_that_underflows_to_zero_is_refused(tmp_path):
    # 1e-320 of 1e300 is 0.0 as a float: the dataset was tokenized, then never drawn.
    tiny = [dict(GOOD, name="a", weight=1e-320), dict(GOOD, name="b", weight=1e300)]
    with pytest.raises(BlendError, match=r"dataset 'a': weight 1e-320 is a share of 0.0"):
        load_blend(_write(tmp_path, tiny))
    close = [dict(GOOD, name="a", weight=1e-300), dict(GOOD, name="b", weight=1e-10)]
    assert load_blend(_write(tmp_path, close)).normalised_weights["a"] > 0


def test_a_key_given_twice_is_refused_not_last_one_wins(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"datasets": [{"name": "a", "path": "p", "weight": 1, "weight": 2}]}')
    with pytest.raises(BlendError, match=r"dup.json: invalid JSON: key 'weight' appears twice"):
        load_blend(path)
    path.write_text('{"datasets": [], "datasets": [{"name": "a", "path": "p", "weight": 1}]}')
    with pytest.raises(BlendError, match=r"key 'datasets' appears twice"):
        load_blend(path)
