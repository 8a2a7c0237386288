"""Deterministic blending of several GPT datasets, with Megatron-Core's rule.

Sample i of the blend goes to the dataset d maximising `w_d * max(i, 1) - drawn_d` (weights
normalised to sum 1, `drawn_d` = samples already taken from d, the first dataset wins ties) and
is that dataset's sample number `drawn_d`. Each dataset is asked for
`ceil(num_samples * w_d * 1.005)` samples, as Megatron does, which shapes its epoch count.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from nemotron.data.gpt_dataset import GPTDataset, GPTDatasetError, cached_arrays
from nemotron.data.mapped import PicklesByReference


def normalise_weights(weights: list[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0:
        raise GPTDatasetError("blend weights sum to zero")
    return [float(w) / total for w in weights]


def build_blending_indices(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index[size], dataset_sample_index[size]) by the largest-deficit rule."""
    weights = normalise_weights(weights)
    num = len(weights)
    drawn = [0] * num
    dataset_index = np.empty(size, dtype=np.int16 if num < 2**15 else np.int64)
    sample_index = np.empty(size, dtype=np.int64)
    for i in range(size):
        scale = float(max(i, 1))
        best, best_error = 0, weights[0] * scale - drawn[0]
        for d in range(1, num):
            error = weights[d] * scale - drawn[d]
            if error > best_error:
                best, best_error = d, error
        dataset_index[i] = best
        sample_index[i] = drawn[best]
        drawn[best] += 1
    return dataset_index, sample_index


class BlendedDataset(PicklesByReference, torch.utils.data.Dataset):
    """Serves sample i from datasets[dataset_index[i]][dataset_sample_index[i]]."""

    def __init__(
        self,
        datasets: list[torch.utils.data.Dataset | None],
        weights: list[float],
        size: int,
        cache_dir: str | Path,
        description: dict,
    ) -> None:
        self.datasets = datasets
        self.weights = normalise_weights(weights)
        self.size = size
        self.description = description

        def build() -> dict[str, np.ndarray]:
            dataset_index, sample_index = build_blending_indices(self.weights, size)
            return {"dataset_index": dataset_index, "dataset_sample_index": sample_index}

        arrays = cached_arrays(
            Path(cache_dir), description, ("dataset_index", "dataset_sample_index"), build
        )
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]

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
    ) -> "BlendedDataset":
        normalised = normalise_weights(weights)
        datasets: list[GPTDataset | None] = []
        for prefix, weight in zip(prefixes, normalised):
            # A zero-weight dataset is never drawn; don't build (or require) its indices.
            wanted = int(math.ceil(num_samples * weight * 1.005))
            datasets.append(
                GPTDataset(prefix, wanted, seq_length, seed, cache_dir, split, vocab_size)
                if wanted else None
            )
        description = {
            "class": "BlendedDataset",
            "datasets": [d.description if d is not None else None for d in datasets],
            "weights": normalised,
            "size": num_samples,
            "split": split,
        }
        return cls(datasets, normalised, num_samples, cache_dir, description)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range 0..{self.size - 1} of the blend")
        dataset = self.datasets[int(self.dataset_index[idx])]
        return dataset[int(self.dataset_sample_index[idx])]

    def sample_length(self, idx: int) -> int:
        """Tokens of sample `idx`, without reading it (blends may mix sample lengths)."""
        dataset = self.datasets[int(self.dataset_index[idx])]
        return dataset.sample_length(int(self.dataset_sample_index[idx]))


def build_mixed_length_dataset(
    parts: list[tuple[str | Path, int, float]],
    split: str,
    num_samples: int,
    seed: int,
    cache_dir: str | Path | None = None,
    vocab_size: int | None = None,
) -> BlendedDataset:
    """Samples of several per-split blends, each at its own sequence length: `parts` are
    (blend.json, seq_length, weight). Within a part, samples keep Megatron's semantics (each
    is seq_length + 1 consecutive tokens of its blend); across parts, sample i comes from the
    part chosen by the blending rule above on the weights (samples, not tokens, are weighted).
    Each part is asked for `ceil(num_samples * w * 1.005)` samples, as a blend asks its
    datasets. Items may differ in length: `sample_length(i)` tells without reading."""
    from nemotron.data.gpt_dataset import build_split_dataset

    if num_samples <= 0:
        raise GPTDatasetError(f"num_samples must be positive, got {num_samples}")
    if not parts:
        raise GPTDatasetError("a mixed-length dataset needs at least one blend")
    for blend, seq_length, weight in parts:
        if seq_length <= 0 or not math.isfinite(weight) or weight < 0:
            raise GPTDatasetError(
                f"mixed-length blend {blend}: seq_length ({seq_length}) must be positive and "
                f"weight ({weight}) >= 0")
    normalised = normalise_weights([w for _, _, w in parts])
    datasets = []
    for (blend, seq_length, _), weight in zip(parts, normalised):
        wanted = int(math.ceil(num_samples * weight * 1.005))
        datasets.append(build_split_dataset(blend, split, wanted, seq_length, seed, cache_dir,
                                            vocab_size) if wanted else None)
    description = {
        "class": "MixedLengthDataset",
        "parts": [d.description if d is not None else None for d in datasets],
        "seq_lengths": [int(n) for _, n, _ in parts],
        "weights": normalised,
        "size": num_samples,
        "split": split,
    }
    cache = Path(cache_dir) if cache_dir is not None else Path(parts[0][0]).parent / "cache"
    return BlendedDataset(datasets, normalised, num_samples, cache, description)
