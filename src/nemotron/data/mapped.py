"""Datasets that cross a process boundary by file reference, not by value.

DataLoader workers start from a clean process (see `nemotron.train.data`), so the dataset is
pickled to each of them. A `numpy.memmap` pickles as an in-memory copy of everything it maps
(a whole `.bin` file, or a sample index of billions of entries); these helpers replace every
memory-mapped array attribute by its file, offset, dtype and shape, and map it again on the
other side.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class _Mapping:
    filename: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    order: str
    mode: str

    def open(self) -> np.memmap:
        return np.memmap(
            self.filename,
            dtype=self.dtype,
            mode=self.mode,  # type: ignore[call-overload]
            offset=self.offset,
            shape=self.shape,
            order=self.order,
        )


def _as_mapping(value: Any) -> Any:
    # Only whole mappings (np.memmap / np.load(mmap_mode=...) results): a slice's `offset`
    # attribute is its parent's, so slices are left to pickle by value.
    if isinstance(value, np.memmap) and value.filename is not None and isinstance(value.base, mmap.mmap):
        order = "F" if value.flags.f_contiguous and not value.flags.c_contiguous else "C"
        return _Mapping(
            str(value.filename), value.dtype, tuple(value.shape), int(value.offset), order, value.mode
        )
    return value


class PicklesByReference:
    """Mixin: memory-mapped array attributes pickle as references to their files."""

    def __getstate__(self) -> dict[str, Any]:
        return {name: _as_mapping(value) for name, value in self.__dict__.items()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(
            {name: value.open() if isinstance(value, _Mapping) else value for name, value in state.items()}
        )
