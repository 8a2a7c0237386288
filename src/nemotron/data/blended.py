"""Deterministic blending of several GPT datasets, with Megatron-Core 0.16's rules.

For a blend of datasets with weights w (normalised to sum 1) asked for N samples:

- dataset d is expected to serve ceil(N * w_d) samples and is asked for
  ceil(ceil(N * w_d) * 1.005) (Megatron's 0.5% `mid_level_dataset_surplus`), which shapes its
  epoch count and so its sample order;
- the blend has sum_d ceil(N * w_d) samples (at least N; a run reads the first N);
- sample i of the blend goes to the dataset d maximising `w_d * max(i, 1) - drawn_d` (`drawn_d`
  = samples already taken from d, the first dataset wins ties) and is that dataset's sample
  number `drawn_d`.

Weights are normalised the way Megatron does (float64 numpy division by the numpy sum: once
for the per-dataset sizes, once more inside the blend), so the blend indices match bit for bit.
A zero-weight entry is left out (Megatron rejects one); the others blend as if it were absent.

Prefixes without weights (`BlendedDataset.build_unweighted`) blend as Megatron's builder does:
each dataset is built for one epoch, the weights are their sample counts, and the blend has
min(N, their sum) samples, by the same rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, cast

import numpy as np
import torch

from nemotron.data import blend_index
from nemotron.data.gpt_dataset import (
    INDEX_FORMAT_VERSION,
    GPTDataset,
    GPTDatasetError,
    cache_marker,
    cached_arrays,
    check_index_memory,
    damaged_cache,
)
from nemotron.data.mapped import PicklesByReference

# Megatron-Core's `mid_level_dataset_surplus`: each dataset builds 0.5% more than its share.
DATASET_SURPLUS = 0.005


class Samples(Protocol):
    """What a blend draws from: a GPT dataset, or a blend itself (the mixed-length mix)."""

    description: dict

    def __len__(self) -> int: ...

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]: ...

    def sample_length(self, idx: int) -> int: ...


def normalise_weights(weights: list[float]) -> list[float]:
    """w / sum(w) in float64 numpy, as Megatron's `normalize` (the sum is numpy's, pairwise)."""
    w = np.asarray(weights, dtype=np.float64)
    total = np.sum(w)
    if not total > 0:
        raise GPTDatasetError("blend weights sum to zero")
    return (w / total).tolist()


def blend_sizes(num_samples: int, weights: list[float]) -> tuple[list[float], list[int], list[int]]:
    """(normalised weights, served, requested) per dataset of a blend of `num_samples`.

    Served is ceil(N * w) and requested ceil(ceil(N * w) * 1.005), with Megatron's inner ceil;
    the blend has sum(served) samples. Zero weights are left out of the normalisation (and
    serve and request 0), so the others come out exactly as in a blend without them.
    """
    if any(not math.isfinite(float(w)) or float(w) < 0 for w in weights):
        raise GPTDatasetError(f"blend weights must be finite and >= 0, got {list(weights)}")
    positive = [d for d, w in enumerate(weights) if float(w) > 0]
    if not positive:
        raise GPTDatasetError("blend weights sum to zero")
    normalised = [0.0] * len(weights)
    for d, w in zip(positive, normalise_weights([weights[d] for d in positive])):
        normalised[d] = w
    served = [int(math.ceil(num_samples * w)) if w > 0 else 0 for w in normalised]
    requested = [int(math.ceil(n * (1 + DATASET_SURPLUS))) for n in served]
    return normalised, served, requested


def _dataset_index_dtype(num_datasets: int) -> type[np.signedinteger]:
    return np.int16 if num_datasets < 2**15 else np.int64


# From this many samples on, the blend index is built by the compiled loop (`blend_index`): its
# build, about a second the first time on a machine, then cached, costs less than the Python
# loop's ~1-2 s per million samples; smaller blends (tests, laptop runs) compile nothing.
COMPILED_MIN_SAMPLES = 1_000_000


def build_blending_indices(
    weights: list[float], size: int, compiled: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index[size], dataset_sample_index[size]) by the largest-deficit rule.

    The weights are normalised here (once, as Megatron's BlendedDataset does, usually on
    weights the builder already normalised). Zero weights are never drawn: their datasets are
    left out of the rule, which runs on the positive weights.

    `compiled`: None builds large indices (COMPILED_MIN_SAMPLES) with the compiled loop where it
    can be built here (else, with a logged warning, with the Python loop), False with the Python
    loop (`largest_deficit_reference`), True with the compiled loop (BlendIndexCompileError where
    it cannot be built). Both give the same arrays, bit for bit."""
    if any(not math.isfinite(float(w)) or float(w) < 0 for w in weights):
        raise GPTDatasetError(f"blend weights must be finite and >= 0, got {list(weights)}")
    if size < 0:
        raise GPTDatasetError(f"a blend cannot have {size} samples")
    positive = [d for d, w in enumerate(weights) if float(w) > 0]
    if not positive:
        raise GPTDatasetError("blend weights sum to zero")
    normalised = normalise_weights([weights[d] for d in positive])
    # The final arrays (30 GB at the recipe's scale), filled in place by either loop.
    dataset_index = np.empty(size, dtype=_dataset_index_dtype(len(weights)))
    sample_index = np.empty(size, dtype=np.int64)
    if compiled is None:
        compiled = size >= COMPILED_MIN_SAMPLES and blend_index.available()
    if compiled:
        blend_index.largest_deficit(
            np.asarray(normalised, dtype=np.float64),
            np.asarray(positive, dtype=np.int64),
            dataset_index,
            sample_index,
        )
    else:
        largest_deficit_reference(normalised, positive, dataset_index, sample_index)
    return dataset_index, sample_index


def largest_deficit_reference(
    weights: list[float], ids: list[int], dataset_index: np.ndarray, sample_index: np.ndarray
) -> None:
    """The rule in Python (the reference of `blend_index.cpp`): sample i goes to the k maximising
    weights[k] * max(i, 1) - drawn[k] in double precision, the first on ties; it is sample
    drawn[k] of dataset ids[k]. Fills the two arrays in place."""
    num = len(weights)
    drawn = [0] * num
    for i in range(len(sample_index)):
        scale = float(max(i, 1))
        best, best_error = 0, weights[0] * scale - drawn[0]
        for d in range(1, num):
            error = weights[d] * scale - drawn[d]
            if error > best_error:
                best, best_error = d, error
        dataset_index[i] = ids[best]
        sample_index[i] = drawn[best]
        drawn[best] += 1


def _blend_description(
    datasets: Sequence[Samples | None], weights: Sequence[float], size: int, split: str
) -> dict:
    """What keys a blend's cached indices: its datasets' own descriptions, weights, size, split."""
    return {
        "class": "BlendedDataset",
        "format": INDEX_FORMAT_VERSION,
        "datasets": [d.description if d is not None else None for d in datasets],
        "weights": list(weights),
        "size": size,
        "split": split,
    }


class BlendedDataset(PicklesByReference, torch.utils.data.Dataset):
    """Serves sample i from datasets[dataset_index[i]][dataset_sample_index[i]]."""

    def __init__(
        self,
        datasets: list[Samples | None],
        weights: list[float],
        size: int,
        cache_dir: str | Path,
        description: dict,
    ) -> None:
        self.datasets = datasets
        self.weights = list(weights)
        self.size = size
        self.description = description
        if not cache_marker(Path(cache_dir), description).exists():  # to be built (rank 0)
            check_index_memory(
                f"a blend of {len(datasets)} datasets asked for {size} samples",
                size * (np.dtype(_dataset_index_dtype(len(weights))).itemsize + 8),
            )

        def build() -> dict[str, np.ndarray]:
            dataset_index, sample_index = build_blending_indices(self.weights, size)
            return {"dataset_index": dataset_index, "dataset_sample_index": sample_index}

        arrays = cached_arrays(
            Path(cache_dir),
            description,
            ("dataset_index", "dataset_sample_index"),
            build,
            lambda arrays: all(a.shape == (size,) for a in arrays.values()),
        )
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        self.cache_marker = cache_marker(Path(cache_dir), description)

    def _source(self, idx: int) -> tuple[Samples, int]:
        """(dataset, its sample) that blend sample `idx` is; a cached index naming no dataset,
        or a zero-weight one (never drawn), is a damaged cache entry. (A sample past a
        dataset's end is the dataset's own IndexError: the tail of a blend Megatron refuses
        asks for one, legitimately, `test_megatron_order.py`.)"""
        k, j = int(self.dataset_index[idx]), int(self.dataset_sample_index[idx])
        dataset = self.datasets[k] if 0 <= k < len(self.datasets) else None
        if dataset is None:
            raise damaged_cache(self.cache_marker, f"sample {idx} of the blend is of dataset {k}")
        return dataset, j

    @classmethod
    def build(
        cls,
        prefixes: list[str],
        weights: list[float],
        num_samples: int,
        seq_length: int,
        seed: int,
        cache_dir: str | Path,
        split: str,
        vocab_size: int | None = None,
        documents: Sequence[tuple[int, int] | None] | None = None,
        split_string: str | None = None,
    ) -> "BlendedDataset":
        """`documents`: each prefix's document range (a split of one blend cut by
        `split_string`), None for all its documents."""
        normalised, served, requested = blend_sizes(num_samples, weights)
        ranges = list(documents) if documents is not None else [None] * len(prefixes)
        datasets: list[Samples | None] = []
        for prefix, wanted, docs in zip(prefixes, requested, ranges):
            # A zero-weight dataset is never drawn; don't build (or require) its indices.
            datasets.append(
                GPTDataset(prefix, wanted, seq_length, seed, cache_dir, split, vocab_size, docs, split_string)
                if wanted
                else None
            )
        description = _blend_description(datasets, normalised, sum(served), split)
        return cls(datasets, normalised, sum(served), cache_dir, description)

    @classmethod
    def build_unweighted(
        cls,
        prefixes: list[str],
        num_samples: int,
        seq_length: int,
        seed: int,
        cache_dir: str | Path,
        split: str,
        vocab_size: int | None = None,
        documents: Sequence[tuple[int, int] | None] | None = None,
        split_string: str | None = None,
    ) -> "BlendedDataset":
        """Prefixes without weights, as Megatron-Core blends them: each dataset is built for one
        epoch (all its samples, none asked for beyond), the weights are the datasets' sample
        counts (normalised once, by the blend), and the blend has min(num_samples, their sum)
        samples. `documents` as in `build`."""
        ranges = list(documents) if documents is not None else [None] * len(prefixes)
        datasets = [
            GPTDataset(prefix, None, seq_length, seed, cache_dir, split, vocab_size, docs, split_string)
            for prefix, docs in zip(prefixes, ranges)
        ]
        lengths = [len(d) for d in datasets]
        size = min(num_samples, sum(lengths))
        description = _blend_description(datasets, lengths, size, split)
        return cls(list(datasets), [float(n) for n in lengths], size, cache_dir, description)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range 0..{self.size - 1} of the blend")
        dataset, j = self._source(idx)
        return dataset[j]

    def sample_length(self, idx: int) -> int:
        """Tokens of sample `idx`, without reading it (blends may mix sample lengths)."""
        dataset, j = self._source(idx)
        return dataset.sample_length(j)


def build_mixed_length_dataset(
    parts: list[tuple[str | Path, int, float]],
    split: str,
    num_samples: int,
    seed: int,
    cache_dir: str | Path | None = None,
    vocab_size: int | None = None,
    split_string: str | None = None,
) -> BlendedDataset:
    """Samples of several per-split blends, each at its own sequence length: `parts` are
    (blend.json, seq_length, weight). Within a part, samples keep Megatron's semantics (each
    is seq_length + 1 consecutive tokens of its blend); across parts, sample i comes from the
    part chosen by the blending rule above on the weights (samples, not tokens, are weighted).
    Each part is asked for `ceil(ceil(num_samples * w) * 1.005)` samples and the mix has
    sum(ceil(num_samples * w)) samples, as a blend of datasets. Items may differ in length: `sample_length(i)` tells without reading.
    `split_string` cuts each blend file of one blend for every split (`build_split_dataset`)."""
    from nemotron.data.gpt_dataset import build_split_dataset

    if num_samples <= 0:
        raise GPTDatasetError(f"num_samples must be positive, got {num_samples}")
    if not parts:
        raise GPTDatasetError("a mixed-length dataset needs at least one blend")
    for blend, seq_length, weight in parts:
        if seq_length <= 0 or not math.isfinite(weight) or weight < 0:
            raise GPTDatasetError(
                f"mixed-length blend {blend}: seq_length ({seq_length}) must be positive and "
                f"weight ({weight}) >= 0"
            )
    normalised, served, requested = blend_sizes(num_samples, [w for _, _, w in parts])
    datasets: list[Samples | None] = []
    for (blend, seq_length, _), wanted in zip(parts, requested):
        datasets.append(
            cast(
                Samples,
                build_split_dataset(
                    blend, split, wanted, seq_length, seed, cache_dir, vocab_size, split_string
                ),
            )
            if wanted
            else None
        )
    description = {
        "class": "MixedLengthDataset",
        "format": INDEX_FORMAT_VERSION,
        "parts": [d.description if d is not None else None for d in datasets],
        "seq_lengths": [int(n) for _, n, _ in parts],
        "weights": normalised,
        "size": sum(served),
        "split": split,
    }
    cache = Path(cache_dir) if cache_dir is not None else Path(parts[0][0]).parent / "cache"
    return BlendedDataset(datasets, normalised, sum(served), cache, description)
