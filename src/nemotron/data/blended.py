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


class BlendedDataset(torch.utils.data.Dataset):
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
    ) -> "BlendedDataset":
        normalised = normalise_weights(weights)
        datasets: list[GPTDataset | None] = []
        for prefix, weight in zip(prefixes, normalised):
            # A zero-weight dataset is never drawn; don't build (or require) its indices.
            wanted = int(math.ceil(num_samples * weight * 1.005))
            datasets.append(
                GPTDataset(prefix, wanted, seq_length, seed, cache_dir, split) if wanted else None
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
