"""Shared by the tests that compare sample orders with fixtures Megatron-Core built
(test_megatron_order.py, test_megatron_split.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nemotron.data.indexed import IndexedDatasetWriter


def write_fixture_prefixes(documents_npz: Path, root: Path, names: tuple[str, ...]) -> None:
    """Write each named dataset of a fixture's documents (`<name>_lengths`, `<name>_tokens`)
    as an indexed prefix under `root`, with this project's writer."""
    documents = np.load(documents_npz)
    for name in names:
        lengths, tokens = documents[f"{name}_lengths"], documents[f"{name}_tokens"]
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        with IndexedDatasetWriter(root / name, np.uint16) as writer:
            for begin, end in zip(bounds[:-1], bounds[1:]):
                writer.add_document(tokens[begin:end])
