"""Datasets pickle their memory maps by file reference (DataLoader workers receive a pickled
dataset): a pickle stays a few KB however large the data, and serves the same samples."""

from __future__ import annotations

import pickle

import numpy as np
import torch

from nemotron.data.blended import BlendedDataset
from nemotron.data.indexed import IndexedDataset
from nemotron.data.mapped import PicklesByReference

from .test_gpt_dataset import write_dataset


def test_blend_pickles_by_reference_and_serves_the_same_samples(tmp_path):
    rng = np.random.default_rng(0)
    prefixes = []
    for name in ("a", "b"):
        prefix = str(tmp_path / name)
        # ~2 MB of tokens per dataset: a pickle by value would be megabytes
        write_dataset(prefix, [rng.integers(0, 1000, size=5000) for _ in range(200)])
        prefixes.append(prefix)
    blend = BlendedDataset.build(prefixes, [0.3, 0.7], 2000, 64, 1, tmp_path / "cache", "train")
    data = pickle.dumps(blend)
    assert len(data) < 16_000, len(data)
    copy = pickle.loads(data)
    assert isinstance(copy.dataset_index, np.memmap) and isinstance(copy.datasets[0].indexed._data, np.memmap)
    for i in (0, 1, 999, 1999):
        for key in ("tokens", "labels", "loss_mask"):
            assert torch.equal(copy[i][key], blend[i][key])


def test_indexed_dataset_reopens_from_its_prefix(tmp_path):
    write_dataset(tmp_path / "d", [np.arange(10), np.arange(5)])
    ds = IndexedDataset(tmp_path / "d")
    data = pickle.dumps(ds)
    assert len(data) < 1_000, len(data)
    copy = pickle.loads(data)
    assert copy.prefix == ds.prefix and np.array_equal(copy[1], ds[1])


class Holder(PicklesByReference):
    pass


def test_only_whole_maps_become_references(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.arange(100_000, dtype=np.int64).reshape(1000, 100))
    h = Holder()
    h.whole = np.load(path, mmap_mode="r")
    h.part = h.whole[10:12]  # a slice pickles by value (its `offset` is its parent's)
    h.plain = [1, 2]
    data = pickle.dumps(h)
    assert len(data) < 4_000, len(data)
    copy = pickle.loads(data)
    assert isinstance(copy.whole, np.memmap) and np.array_equal(copy.whole, h.whole)
    assert np.array_equal(copy.part, h.part) and copy.plain == [1, 2]
