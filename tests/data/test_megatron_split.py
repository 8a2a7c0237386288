"""One blend for every split, cut by a split string (Megatron's `--data-path` with `--split`),
against what Megatron-Core 0.16.1 itself built (tests/data/fixtures/megatron_split, regenerated
by `tests/data/make_megatron_fixtures.py --split`): each split's document range per prefix, every
index array of its datasets and blend, and the tokens of every sample the training loop asks
of it (train: train_iters * gbs; valid: (train_iters // eval_interval + 1) * eval_iters * gbs;
test: eval_iters * gbs; Megatron's `get_train_valid_test_num_samples`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nemotron.data.blended import BlendedDataset
from nemotron.data.gpt_dataset import (
    GPTDataset,
    GPTDatasetError,
    build_split_dataset,
    parse_split,
    split_bounds,
    split_documents,
    split_has_share,
)
from nemotron.data.indexed import IndexedDatasetWriter

from .megatron_fixtures import write_fixture_prefixes

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "megatron_split"
MANIFEST = json.loads((FIXTURES / "cases.json").read_text())
CASES = {case["name"]: case for case in MANIFEST["cases"]}
SPLITS = ("train", "valid", "test")


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory) -> Path:
    """The fixture documents written with this project's writer."""
    root = tmp_path_factory.mktemp("megatron_split")
    write_fixture_prefixes(FIXTURES / "documents.npz", root, ("d", "e", "f", "g", "t"))
    return root


def write_blend(root: Path, tmp_path: Path, case: dict) -> Path:
    """The case's blend as Megatron's --data-path reads it: weight, prefix pairs (weights as
    strings) or prefixes alone, at the top of the blend file."""
    paths = [str(root / p) for p in case["prefixes"]]
    entries = (
        paths if case["weights"] is None else [x for w, p in zip(case["weights"], paths) for x in (str(w), p)]
    )
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps(entries))
    return blend


def served(dataset, count: int) -> np.ndarray:
    rows = []
    for i in range(count):
        item = dataset[i]
        rows.append(np.concatenate([item["tokens"].numpy(), item["labels"].numpy()[-1:]]))
    return np.stack(rows)


def test_fixtures_cover_the_cases_the_issue_names():
    assert MANIFEST["megatron_core"] == "0.16.1"
    assert {c["split"] for c in CASES.values()} >= {"99,1,0", "969,30,1", "1,1,1", "100,0,0", "98,2,0"}
    # Weights not summing to 1, split numbers not summing to 100, a missing third number.
    assert any(c["weights"] and sum(c["weights"]) != 1 for c in CASES.values())
    assert {"9 0.5 0.5", "7,2,1", "98,2"} <= {c["split"] for c in CASES.values()}
    # Some valid split is read over several epochs, one document spanning many samples.
    assert max(max(c["splits"]["valid"]["epochs"]) for c in CASES.values() if c["splits"]["valid"]) > 10


@pytest.mark.parametrize("name", sorted(CASES))
def test_split_bounds_and_document_ranges_match_megatron(prefixes, name):
    from nemotron.data.indexed import IndexedDataset

    case = CASES[name]
    bounds = split_bounds(case["split"])
    for k, split in enumerate(SPLITS):
        expected = case["split_matrix"][k]
        assert (bounds[k] is None) == (expected is None), split
        if expected is None:
            assert case["splits"][split] is None
            continue
        assert list(bounds[k]) == expected, split  # float for float: the ranges round the same
        for prefix, want in zip(case["prefixes"], case["splits"][split]["ranges"]):
            documents = len(IndexedDataset(str(prefixes / prefix)).sequence_lengths)
            assert list(split_documents(documents, bounds[k])) == want, (split, prefix)


def _check_gpt(ds: GPTDataset, expected, record: dict, k: int, key: str) -> None:
    assert ds.documents == tuple(record["ranges"][k]), key
    assert ds.num_epochs == record["epochs"][k], key
    for name in ("document_index", "sample_index", "shuffle_index"):
        np.testing.assert_array_equal(
            np.asarray(getattr(ds, name), dtype=np.int64), expected[f"{key}_{name}"], err_msg=f"{key}_{name}"
        )


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_split_matches_megatron(prefixes, tmp_path, name, split):
    case = CASES[name]
    record = case["splits"][split]
    blend = write_blend(prefixes, tmp_path, case)
    size = case["sizes"][SPLITS.index(split)]
    args = (blend, split, size, case["seq_length"], case["seed"], tmp_path / "cache")
    assert split_has_share(blend, split, case["split"]) == (record is not None)
    if record is None:
        # Megatron builds no dataset for a split without a share (no evaluation on it).
        with pytest.raises(GPTDatasetError, match=rf"gives the '{split}' split no share"):
            build_split_dataset(*args, split_string=case["split"])
        return
    expected = np.load(FIXTURES / f"{name}.npz")
    ds = build_split_dataset(*args, split_string=case["split"])
    assert type(ds).__name__ == record["class"]
    assert len(ds) == record["length"]
    if isinstance(ds, GPTDataset):
        _check_gpt(ds, expected, record, 0, f"{split}_dataset0")
    else:
        assert isinstance(ds, BlendedDataset)
        np.testing.assert_array_equal(
            np.asarray(ds.dataset_index, dtype=np.int64), expected[f"{split}_dataset_index"]
        )
        np.testing.assert_array_equal(ds.dataset_sample_index, expected[f"{split}_dataset_sample_index"])
        assert len(ds.datasets) == len(case["prefixes"])
        for k, dataset in enumerate(ds.datasets):
            assert isinstance(dataset, GPTDataset)
            if record["num_samples"][k] is None:
                assert dataset.num_epochs == 1  # without weights: one epoch of its documents
            _check_gpt(dataset, expected, record, k, f"{split}_dataset{k}")
    np.testing.assert_array_equal(served(ds, min(size, len(ds))), expected[f"{split}_tokens"])


def test_valid_splits_cover_both_sides_of_the_separate_final_epoch(prefixes, tmp_path):
    # The valid split of a few documents is read over many epochs: the separate final epoch
    # rule applies to it as to train (Megatron has no valid-only rule; its
    # drop_last_partial_validation_sequence default keeps whole samples only, as here).
    seen = set()
    for name, case in CASES.items():
        record = case["splits"]["valid"]
        if record is None:
            continue
        (tmp_path / name).mkdir()
        ds = build_split_dataset(
            write_blend(prefixes, tmp_path / name, case),
            "valid",
            case["sizes"][1],
            case["seq_length"],
            case["seed"],
            tmp_path / "cache",
            split_string=case["split"],
        )
        for dataset in ds.datasets if isinstance(ds, BlendedDataset) else [ds]:
            assert isinstance(dataset, GPTDataset)
            if dataset.num_epochs > 1:
                seen.add(dataset.separate_final_epoch)
    assert seen == {True, False}


def test_default_split_is_megatrons_legacy_default(prefixes, tmp_path):
    # Megatron's --data-path without --split reads "969, 30, 1".
    case = CASES["abc_969_30_1"]
    blend = write_blend(prefixes, tmp_path, case)
    expected = np.load(FIXTURES / "abc_969_30_1.npz")
    ds = build_split_dataset(
        blend, "test", case["sizes"][2], case["seq_length"], case["seed"], tmp_path / "c"
    )
    np.testing.assert_array_equal(served(ds, case["sizes"][2]), expected["test_tokens"])


@pytest.mark.parametrize("weighted", [True, False])
def test_a_prefix_with_no_documents_in_a_split_is_one_error(prefixes, tmp_path, weighted):
    # "t" holds 5 documents: "99,1,0" gives its valid split round(0.99 * 5) = 5 .. 5. Megatron
    # never returns (weighted: its epoch count loops on zero tokens) or fails an assert
    # (without weights: a dataset of length 0 in the blend); here one error naming it.
    assert "no result" in MANIFEST["empty_range"]["weighted"]
    assert MANIFEST["empty_range"]["unweighted"].startswith("ERROR AssertionError")
    paths = [str(prefixes / "t"), str(prefixes / "d")]
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps(["1", paths[0], "1", paths[1]] if weighted else paths))
    with pytest.raises(
        GPTDatasetError,
        match=r"'valid' split \(split '99,1,0'\) of dataset .*/t, its documents \[5, 5\) of 5, holds no document.*larger share \(data.split\)",
    ):
        build_split_dataset(blend, "valid", 8, 4, 1, tmp_path / "cache", split_string="99,1,0")


@pytest.mark.parametrize(
    ("split", "fractions"),
    [
        ("99,1,0", [0.99, 0.01, 0.0]),
        ("99,1,0,", [0.99, 0.01, 0.0]),  # a trailing comma moves no number
        ("969, 30, 1", [0.969, 0.03, 0.001]),
        ("98,2", [0.98, 0.02, 0.0]),
        ("9 0.5 0.5", [0.9, 0.05, 0.05]),
        ("1,1,1", [1 / 3, 1 / 3, 1 / 3]),
    ],
)
def test_parse_split(split, fractions):
    np.testing.assert_allclose(parse_split(split), fractions, rtol=1e-15)


@pytest.mark.parametrize(
    ("split", "match"),
    [
        ("99,-1,0", "expected up to three numbers"),  # Megatron drops the minus sign
        ("99,1,0,5", "at most 3"),
        ("0,0,0", "sum to a finite value > 0"),
        ("", "expected up to three numbers"),
        ("99,1.0.0", "not all numbers"),
        ("train=99", "expected up to three numbers"),
        # Megatron reads the numbers alone: valid would get the 2 written for test, train the 99
        # written for valid.
        ("98,,2", "empty field"),
        (",99,1", "empty field"),
        ("98, ,2", "empty field"),
    ],
)
def test_bad_split_strings_are_one_error(split, match):
    with pytest.raises(GPTDatasetError, match=match):
        parse_split(split)


def test_split_string_with_a_per_split_blend_is_an_error(prefixes, tmp_path):
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps({"train": [str(prefixes / "d")]}))
    with pytest.raises(GPTDatasetError, match="gives each split its own blend.*leave data.split unset"):
        build_split_dataset(blend, "train", 4, 8, 1, tmp_path / "cache", split_string="99,1,0")


@pytest.mark.parametrize("name", ["abc_969_30_1", "unweighted_100_0_0", "one_99_1_0"])
def test_training_data_asks_each_split_for_megatrons_sizes(prefixes, tmp_path, name):
    # The run's loader (data.blend of one blend, data.split) builds each split with the size
    # Megatron's training loop asks for, so every sample it serves is Megatron's.
    from nemotron.data.config import DataConfig
    from nemotron.train.config import TrainConfig
    from nemotron.train.data import TrainingData
    from nemotron.train.plan import plan_batches

    case = CASES[name]
    gbs = case["global_batch_size"]
    train = TrainConfig(
        train_iters=case["train_iters"],
        global_batch_size=gbs,
        micro_batch_size=gbs,
        seq_length=case["seq_length"],
        seed=case["seed"],
        eval_interval=case["eval_interval"],
        eval_iters=case["eval_iters"],
    )
    data_config = DataConfig(
        blend=str(write_blend(prefixes, tmp_path, case)), split=case["split"], cache_dir=str(tmp_path / "c")
    )
    data = TrainingData(data_config, train, plan_batches(train), vocab_size=60000)
    data.open_datasets()
    expected = np.load(FIXTURES / f"{name}.npz")
    built = {
        "train": data.train_dataset(1),
        "valid": data.eval_dataset("valid"),
        "test": data.eval_dataset("test"),
    }
    for split, size in zip(SPLITS, case["sizes"]):
        if case["splits"][split] is None:
            assert built[split] is None, split  # no share: no evaluation on it
            continue
        assert len(built[split]) == case["splits"][split]["length"], split
        np.testing.assert_array_equal(served(built[split], size), expected[f"{split}_tokens"], err_msg=split)


def test_a_share_of_empty_documents_is_one_error(tmp_path):
    # 99 documents of 3 tokens and an empty last one: "99,1,0" gives valid document [99, 100),
    # which holds no token.
    with IndexedDatasetWriter(tmp_path / "p", np.uint16) as writer:
        for k in range(99):
            writer.add_document(np.array([k, k + 1, k + 2], dtype=np.uint16))
        writer.add_document(np.array([], dtype=np.uint16))
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps([str(tmp_path / "p")]))
    train = build_split_dataset(blend, "train", 4, 8, 1, tmp_path / "cache", split_string="99,1,0")
    assert isinstance(train, GPTDataset) and train.documents == (0, 99)
    with pytest.raises(GPTDatasetError, match=r"documents \[99, 100\) of 100, has no tokens"):
        build_split_dataset(blend, "valid", 4, 8, 1, tmp_path / "cache", split_string="99,1,0")


def test_split_strings_share_one_cache_without_mixing_their_indices(prefixes, tmp_path):
    # Same prefix, split name, N and seed, other split strings: other documents, so other
    # cached indices (the document range is part of the cache key).
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps([str(prefixes / "d")]))
    built = {
        split: build_split_dataset(blend, "valid", 16, 8, 3, tmp_path / "cache", split_string=split)
        for split in ("99,1,0", "98,2,0")
    }
    assert built["99,1,0"].documents == (594, 600) and built["98,2,0"].documents == (588, 600)
    for ds in built.values():
        assert isinstance(ds, GPTDataset)
        assert set(np.asarray(ds.document_index).tolist()) == set(range(*ds.documents))


def test_one_blend_as_one_string_reads_as_the_list(prefixes, tmp_path):
    # Megatron's --data-args-path form: one whitespace-separated string of weight, prefix pairs.
    case = CASES["cab_98_2_0_unnormalised"]
    paths = [str(prefixes / p) for p in case["prefixes"]]
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps(" ".join(f"{w} {p}" for w, p in zip(case["weights"], paths))))
    expected = np.load(FIXTURES / "cab_98_2_0_unnormalised.npz")
    ds = build_split_dataset(
        blend,
        "valid",
        case["sizes"][1],
        case["seq_length"],
        case["seed"],
        tmp_path / "c",
        split_string="98,2,0",
    )
    np.testing.assert_array_equal(served(ds, case["sizes"][1]), expected["valid_tokens"])
