"""Mixed sequence lengths (long-context phase): several per-split blends, each at its own sample
length, interleaved per sample by Megatron's blending rule; each sample keeps the semantics of
its own blend at its own length."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nemotron.data.blended import build_blending_indices, build_mixed_length_dataset
from nemotron.data.gpt_dataset import GPTDatasetError, build_split_dataset

from .test_gpt_dataset import random_docs, write_dataset


@pytest.fixture
def blends(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name in ("long", "short"):
        write_dataset(tmp_path / name, random_docs(rng, 40, 50))
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"train": ["1", str(tmp_path / name)]}))
        paths.append(path)
    return paths


def test_samples_follow_each_blend_at_its_own_length(blends, tmp_path):
    long_blend, short_blend = blends
    parts = [(long_blend, 32, 1.0), (short_blend, 8, 3.0)]
    mixed = build_mixed_length_dataset(parts, "train", 40, seed=5, cache_dir=tmp_path / "cache")
    dataset_index, sample_index = build_blending_indices([0.25, 0.75], 40)
    # each part is asked for ceil(40 * w * 1.005) samples, as a blend asks its datasets
    long_ds = build_split_dataset(long_blend, "train", 11, 32, 5, tmp_path / "cache")
    short_ds = build_split_dataset(short_blend, "train", 31, 8, 5, tmp_path / "cache")
    lengths = []
    for i in range(40):
        item = mixed[i]
        source = (long_ds, short_ds)[int(dataset_index[i])]
        expected = source[int(sample_index[i])]
        for key in ("tokens", "labels", "loss_mask"):
            assert np.array_equal(item[key].numpy(), expected[key].numpy())
        assert mixed.sample_length(i) == len(item["tokens"])
        lengths.append(len(item["tokens"]))
    assert lengths.count(32) == 10 and lengths.count(8) == 30  # the weights, sample by sample
    # deterministic: a rebuild (from the cache) serves the same samples
    again = build_mixed_length_dataset(parts, "train", 40, seed=5, cache_dir=tmp_path / "cache")
    assert all(np.array_equal(again[i]["tokens"], mixed[i]["tokens"]) for i in range(40))


def test_bad_parts_are_rejected(blends, tmp_path):
    with pytest.raises(GPTDatasetError, match="seq_length \\(0\\) must be positive"):
        build_mixed_length_dataset([(blends[0], 0, 1.0)], "train", 4, 1, tmp_path)
    with pytest.raises(GPTDatasetError, match="weight \\(-1.0\\) >= 0"):
        build_mixed_length_dataset([(blends[0], 8, -1.0)], "train", 4, 1, tmp_path)
    with pytest.raises(GPTDatasetError, match="has no 'valid' split"):
        build_mixed_length_dataset([(blends[0], 8, 1.0)], "valid", 4, 1, tmp_path)
