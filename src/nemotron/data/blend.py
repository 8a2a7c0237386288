"""Raw blend definitions (``data_blend_raw.json``) and the per-split ``blend.json`` data prep writes.

Raw blend::

    {"datasets": [{"name": "cc-hq", "path": "hf://nvidia/Nemotron-CC-v2.1",
                   "subset": "High-Quality", "text_field": "text", "weight": 1.0}, ...]}

Weight semantics: a dataset's weight is its share of the training tokens of the blend
(weights are normalised over the datasets, so ``[2, 1, 1]`` means 50% / 25% / 25%),
independent of how many documents or shards the dataset has. Data prep cuts each dataset into
shards and gives each shard prefix the weight ``dataset_weight * shard_tokens /
dataset_tokens`` (normalised over the blend). Megatron draws samples from prefixes in
proportion to their weights, so the shards of one dataset together draw exactly the dataset's
weight, and within the dataset each shard is drawn in proportion to its size. (The public
recipe gives every shard the full dataset weight, so a dataset cut into 128 shards silently
counts 128 times.) The same rule is applied to the valid and test splits, which hold
documents from every dataset.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from nemotron.data.sources import HUB_SCHEME
from nemotron.utils.fs import atomic_write_text, read_json

SPLITS = ("train", "valid", "test")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

REQUIRED_KEYS = ("name", "path", "weight")
OPTIONAL_KEYS = (
    "subset",  # hub config name (``datasets`` "name")
    "revision",  # hub branch, tag or commit; resolved to a commit in metadata.json
    "hf_split",  # hub split to read, default "train"
    "text_field",  # default: DataPrepConfig.text_field
    "split",  # {"valid": f, "test": f}: this dataset's valid/test fractions
    "min_doc_chars",  # per-dataset filter overrides
    "max_doc_tokens",
)
ALLOWED_KEYS = REQUIRED_KEYS + OPTIONAL_KEYS


class BlendError(ValueError):
    """An invalid blend definition; the message names the file, entry and field."""


@dataclass(frozen=True)
class BlendEntry:
    name: str
    path: str
    weight: float
    subset: str | None = None
    revision: str | None = None
    hf_split: str = "train"
    text_field: str | None = None
    valid_fraction: float | None = None
    test_fraction: float | None = None
    min_doc_chars: int | None = None
    max_doc_tokens: int | None = None


@dataclass(frozen=True)
class Blend:
    entries: tuple[BlendEntry, ...]
    source: str  # the file it came from (for messages)

    @property
    def normalised_weights(self) -> dict[str, float]:
        total = sum(entry.weight for entry in self.entries)
        return {entry.name: entry.weight / total for entry in self.entries}

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def _nearest(key: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(options)})"


def _check_number(
    where: str,
    key: str,
    value: Any,
    *,
    integer: bool = False,
    positive: bool = True,
    maximum: float | None = None,
) -> float | int:
    wrong_type = isinstance(value, bool) or not isinstance(value, (int, float))
    if integer and not wrong_type and not isinstance(value, int):
        wrong_type = True
    if wrong_type:
        kind = "an integer" if integer else "a number"
        raise BlendError(f"{where}: field {key!r} must be {kind}, got {value!r}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer past a float's range (~1.8e308)
        finite = False
    if not finite:
        shown = repr(value) if len(repr(value)) <= 40 else f"an integer of {len(str(abs(value)))} digits"
        raise BlendError(f"{where}: field {key!r} must be finite, got {shown}")
    if positive and value <= 0:
        raise BlendError(f"{where}: field {key!r} must be > 0, got {value!r}")
    if not positive and value < 0:
        raise BlendError(f"{where}: field {key!r} must be >= 0, got {value!r}")
    if maximum is not None and value > maximum:
        raise BlendError(f"{where}: field {key!r} must be <= {maximum}, got {value!r}")
    return value


def _check_string(where: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BlendError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    if "\0" in value:
        raise BlendError(f"{where}: field {key!r} must not contain a NUL character, got {value!r}")
    return value


def parse_blend(data: Any, source: str = "<blend>") -> Blend:
    """Validate a raw blend (already parsed JSON) into a :class:`Blend`."""
    if isinstance(data, list):
        data = {"datasets": data}
    if not isinstance(data, dict):
        raise BlendError(f"{source}: a blend must be an object with a 'datasets' list")
    for key in data:
        if key != "datasets":
            raise BlendError(f"{source}: unknown top-level key {key!r}{_nearest(key, ['datasets'])}")
    datasets = data.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise BlendError(f"{source}: 'datasets' must be a non-empty list")
    entries: list[BlendEntry] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(datasets):
        label = f"{source}: datasets[{index}]"
        if not isinstance(raw, dict):
            raise BlendError(f"{label}: each entry must be an object, got {type(raw).__name__}")
        if isinstance(raw.get("name"), str):
            label += f" ({raw['name']!r})"
        for key in raw:
            if key not in ALLOWED_KEYS:
                raise BlendError(f"{label}: unknown key {key!r}{_nearest(key, ALLOWED_KEYS)}")
        for key in REQUIRED_KEYS:
            if key not in raw:
                raise BlendError(f"{label}: missing required field {key!r}")
        name = _check_string(label, "name", raw["name"])
        if not NAME_PATTERN.match(name):
            raise BlendError(
                f"{label}: field 'name' must use only letters, digits, '.', '_' and '-' "
                f"(it names shard files), got {name!r}"
            )
        if name in seen:
            raise BlendError(f"{label}: duplicate name {name!r} (also datasets[{seen[name]}])")
        seen[name] = index
        path = _check_string(label, "path", raw["path"])
        weight = float(_check_number(label, "weight", raw["weight"]))
        optional: dict[str, Any] = {}
        for key in ("subset", "revision", "hf_split", "text_field"):
            if raw.get(key) is not None:
                optional[key] = _check_string(label, key, raw[key])
                if key != "text_field" and not path.startswith(HUB_SCHEME):
                    # a local file has no subsets, revisions or splits: ignoring the field
                    # would prepare all of it, silently, where a part was asked for
                    raise BlendError(
                        f"{label}: field {key!r} applies to {HUB_SCHEME} datasets only, not to {path!r}"
                    )
        for key in ("min_doc_chars", "max_doc_tokens"):
            if raw.get(key) is not None:
                optional[key] = int(_check_number(label, key, raw[key], integer=True))
        if raw.get("split") is not None:
            split = raw["split"]
            if not isinstance(split, dict):
                raise BlendError(
                    f'{label}: field \'split\' must be an object like {{"valid": 0.01, "test": 0.01}}'
                )
            for key in split:
                if key not in ("valid", "test"):
                    raise BlendError(
                        f"{label}: field 'split' has unknown key {key!r}{_nearest(key, ['valid', 'test'])}"
                    )
            valid = _check_number(label, "split.valid", split.get("valid", 0.0), positive=False, maximum=1.0)
            test = _check_number(label, "split.test", split.get("test", 0.0), positive=False, maximum=1.0)
            if valid + test >= 1.0:
                raise BlendError(f"{label}: field 'split' leaves no training documents (valid + test >= 1)")
            optional["valid_fraction"], optional["test_fraction"] = float(valid), float(test)
        entries.append(BlendEntry(name=name, path=path, weight=weight, **optional))
    total = sum(entry.weight for entry in entries)
    if not math.isfinite(total):
        # Normalising by an infinite sum would make every share 0 (then a division by zero
        # after the whole input was tokenized).
        raise BlendError(f"{source}: the weights sum to {total}: scale them down (only their ratios matter)")
    for entry in entries:
        if entry.weight / total == 0.0:
            # Its share underflows a float: tokenized, then never drawn, with no word.
            raise BlendError(
                f"{source}: dataset {entry.name!r}: weight {entry.weight!r} is a share of 0.0 of the "
                f"total {total!r}, so it would never be drawn: bring the weights closer together "
                "(only their ratios matter)"
            )
    return Blend(entries=tuple(entries), source=source)


def source_directory(spec: str, base_dir: Path) -> Path | None:
    """The local directory a blend entry's `path` names, resolved as the source resolves it
    (relative to `base_dir`); None for a file, a glob or a dataset on the hub."""
    if spec.startswith(HUB_SCHEME):
        directory = Path(spec[len(HUB_SCHEME) :]) if spec.startswith(HUB_SCHEME + "/") else None
    else:
        directory = Path(spec).expanduser()
        if not directory.is_absolute():
            directory = base_dir / directory
    return directory.resolve() if directory is not None and directory.is_dir() else None


def check_job_dir_apart(blend: Blend, base_dir: Path, job_dir: Path) -> None:
    """No directory source may contain the run's job directory (`runs/` under the working
    directory by default): its job.json and logs, written as the run goes, were read as
    records, and every run changed the source, so none was up to date. The CLI asks before it
    makes the job directory, so a refused run leaves nothing in the source."""
    job = Path(job_dir).expanduser().resolve()
    for index, entry in enumerate(blend):
        directory = source_directory(entry.path, base_dir)
        if directory is not None and job.is_relative_to(directory):
            raise BlendError(
                f"{blend.source}: datasets[{index}] ({entry.name!r}): the job directory {job} is "
                f"inside its source directory {directory}, so the job's own files (job.json, "
                "logs) would be read as records; run from another directory or give --job-dir "
                "outside it"
            )


def load_blend(path: str | os.PathLike) -> Blend:
    """Read and validate a ``data_blend_raw.json`` file."""
    path = Path(path)
    return parse_blend(read_json(path, BlendError, "blend file"), source=str(path))


@dataclass
class ShardWeight:
    """One prefix of a split: the dataset it belongs to and its token count."""

    dataset: str
    prefix: str
    tokens: int
    weight: float = field(default=0.0)


def shard_weights(dataset_weights: Mapping[str, float], shards: Sequence[ShardWeight]) -> list[ShardWeight]:
    """Assign each shard ``dataset_weight * shard_tokens / dataset_tokens``, normalised to sum 1.

    Datasets without tokens in this split (and empty shards) get no prefix: they cannot be drawn.
    """
    totals: dict[str, int] = {}
    for shard in shards:
        totals[shard.dataset] = totals.get(shard.dataset, 0) + shard.tokens
    live = [s for s in shards if s.tokens > 0]
    raw = [dataset_weights[s.dataset] * s.tokens / totals[s.dataset] for s in live]
    total = sum(raw)
    return [ShardWeight(s.dataset, s.prefix, s.tokens, w / total) for s, w in zip(live, raw)]


def format_weight(weight: float) -> str:
    return repr(float(weight))


def write_split_blend(path: str | os.PathLike, splits: Mapping[str, Sequence[ShardWeight]]) -> Path:
    """Write Megatron's per-split ``blend.json`` atomically (temporary name, then rename)."""
    path = Path(path)
    blend: dict[str, list[str]] = {}
    for split in SPLITS:
        entries = splits.get(split, ())
        blend[split] = [item for shard in entries for item in (format_weight(shard.weight), shard.prefix)]
    atomic_write_text(path, json.dumps(blend, indent=2) + "\n")
    return path
