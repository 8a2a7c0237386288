"""An independent reader of Megatron's indexed format, written from the format description
(docs/reference.md §4) with ``struct`` only, so tests do not check the library against itself."""

from __future__ import annotations

import struct
from pathlib import Path

STRUCT_CODES = {1: "B", 2: "b", 3: "h", 4: "i", 5: "q", 6: "d", 7: "f", 8: "H"}
ITEM_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}


def read_index(prefix) -> dict:
    raw = Path(f"{prefix}.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, count, doc_count = struct.unpack_from("<QBQQ", raw, 9)
    pos = 9 + 8 + 1 + 8 + 8
    lengths = list(struct.unpack_from(f"<{count}i", raw, pos))
    pos += 4 * count
    pointers = list(struct.unpack_from(f"<{count}q", raw, pos))
    pos += 8 * count
    documents = list(struct.unpack_from(f"<{doc_count}q", raw, pos))
    pos += 8 * doc_count
    assert pos == len(raw), "trailing bytes in .idx"
    return {
        "version": version,
        "code": code,
        "lengths": lengths,
        "pointers": pointers,
        "documents": documents,
    }


def read_sequences(prefix) -> list[list[int]]:
    index = read_index(prefix)
    data = Path(f"{prefix}.bin").read_bytes()
    fmt, size = STRUCT_CODES[index["code"]], ITEM_SIZES[index["code"]]
    out = []
    for length, pointer in zip(index["lengths"], index["pointers"]):
        out.append(list(struct.unpack_from(f"<{length}{fmt}", data, pointer)))
    assert sum(index["lengths"]) * size == len(data), "trailing bytes in .bin"
    return out
