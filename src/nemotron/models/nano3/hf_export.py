"""`nemotron nano3 export hf`: a checkpoint -> a transformers directory that works on its own.

Beside the weights and `config.json` (`hf.save_hf`), the directory gets the tokenizer the model
was trained with (`tokenizer.json`, `tokenizer_config.json`, ... as transformers'
`save_pretrained` writes them) and `generation_config.json`, so that
`AutoTokenizer.from_pretrained(out)` and `AutoModelForCausalLM.from_pretrained(out)` load it
with nothing else. The config's and the generation config's bos/eos/pad ids are the tokenizer's.

Which tokenizer: `--tokenizer` (a transformers tokenizer directory, a `tokenizer.json` or a hub
id), else the one recorded in the checkpoint's lineage manifest (`ModelArtifact-pretrain.json`
-> the data-prep `metadata.json` -> `tokenizer`: its files, or its hub id at the recorded
commit). A tokenizer with more tokens than the model's vocabulary is refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nemotron.models.nano3.hf import HFInteropError, save_hf


@dataclass(frozen=True)
class HFExport:
    checkpoint: Path
    out: Path
    tokenizer: str | None  # where the tokenizer came from, None when exported without one
    skipped: tuple[str, ...] = ()  # damaged checkpoints of the save dir passed over, and why


def trained_tokenizer_record(checkpoint_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The data-prep tokenizer record of the data this checkpoint was trained on, if known."""
    from nemotron.artifacts.model import MODEL_ARTIFACT_FILE, ArtifactError, read_model_artifact

    if not (Path(checkpoint_dir) / MODEL_ARTIFACT_FILE).is_file():
        return None  # e.g. a checkpoint imported from Hugging Face
    try:
        manifest = read_model_artifact(Path(checkpoint_dir))
    except ArtifactError as err:
        raise HFInteropError(str(err)) from err
    where = Path(checkpoint_dir) / MODEL_ARTIFACT_FILE
    record: Any = manifest
    keys: list[str] = []
    for key in ("data", "content", "tokenizer"):  # absent at any level: no record
        keys.append(key)
        record = record.get(key)
        if record is None:
            return None
        if not isinstance(record, dict):  # damaged lineage: named, not an AttributeError
            raise HFInteropError(f"{where}: {'.'.join(keys)} is not an object, got {record!r}")
    for name in ("bos_id", "eos_id"):
        token_id = record.get(name)
        if token_id is not None and (type(token_id) is not int or token_id < 0):
            raise HFInteropError(
                f"{where}: data.content.tokenizer.{name} must be a token id, got {token_id!r}"
            )
    return record


def _fast_tokenizer_from_file(path: Path, record: dict[str, Any] | None):
    """A bare `tokenizer.json` (no tokenizer_config.json beside it) as a transformers tokenizer,
    with the bos/eos the data was tokenized with."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    special = {}
    raw = Tokenizer.from_file(str(path))
    for name in ("bos", "eos"):
        token_id = (record or {}).get(f"{name}_id")
        if token_id is not None:
            special[f"{name}_token"] = raw.id_to_token(int(token_id))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), **special)


# What can name a hub repository (`name` or `org/name`); anything else given to --tokenizer is a path.
HUB_ID = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")


def load_tokenizer_for_export(spec: str | None, record: dict[str, Any] | None):
    """(transformers tokenizer, where it came from) for `spec` or the training record."""
    from transformers import AutoTokenizer

    def from_path(path: Path):
        if path.is_dir():
            if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
                # transformers' own answer names neither the directory nor what it lacks
                raise HFInteropError(
                    f"tokenizer {path}: a directory without tokenizer.json or tokenizer_config.json, "
                    "not a transformers tokenizer directory"
                )
            return AutoTokenizer.from_pretrained(str(path))
        if path.is_file() and path.suffix == ".json":
            beside = path.parent / "tokenizer_config.json"
            if path.name == "tokenizer.json" and beside.is_file():
                return AutoTokenizer.from_pretrained(str(path.parent))
            return _fast_tokenizer_from_file(path, record)
        raise HFInteropError(
            f"tokenizer {path}: not a transformers tokenizer directory or a tokenizer.json "
            "(a SentencePiece .model is not converted: pass a transformers tokenizer directory)"
        )

    try:
        if spec is not None:
            path = Path(spec).expanduser()
            if path.exists():
                return from_path(path), str(path)
            if not HUB_ID.fullmatch(spec):
                # a path that is not there (the hub would say only "Repo id must be in the form...")
                raise HFInteropError(f"tokenizer {spec}: no such file or directory (nor a hub id: org/name)")
            return AutoTokenizer.from_pretrained(spec), spec  # a hub id
        if record is None:
            return None, None
        for key in ("config_path", "path"):
            if record.get(key) and Path(record[key]).exists():
                path = Path(record[key])
                if key == "config_path":
                    return AutoTokenizer.from_pretrained(str(path.parent)), str(path.parent)
                return from_path(path), str(path)
        source, revision = record.get("source"), record.get("revision")
        if source and revision:
            return AutoTokenizer.from_pretrained(source, revision=revision), f"{source}@{revision}"
    except HFInteropError:
        raise
    except Exception as err:  # transformers/hub errors: say which tokenizer
        known = record or {}
        what = spec or known.get("source") or known.get("path")
        raise HFInteropError(f"cannot load tokenizer {what!r}: {err}") from err
    raise HFInteropError(
        f"the tokenizer the model was trained with ({record.get('source') or record.get('path')}) "
        "is not available here: pass --tokenizer DIR|tokenizer.json|HUB_ID (or --no-tokenizer)"
    )


def token_ids(tokenizer, record: dict[str, Any] | None) -> dict[str, int | None]:
    """bos/eos/pad ids for config.json and generation_config.json: the training record's where it
    has them (what the data was tokenized with), else the tokenizer's; pad falls back to eos."""
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    for name in ("bos", "eos"):
        if record and record.get(f"{name}_id") is not None:
            ids[f"{name}_token_id"] = int(record[f"{name}_id"])
    if ids["pad_token_id"] is None:
        ids["pad_token_id"] = ids["eos_token_id"]
    return ids


def export_hf(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: torch.dtype | None = torch.bfloat16,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
    tokenizer: str | None = None,
    with_tokenizer: bool = True,
) -> HFExport:
    """Write a self-contained transformers directory for a training checkpoint (or save dir)."""
    try:
        from transformers import GenerationConfig
    except ImportError as err:  # transformers is the optional `hf` extra
        raise HFInteropError("export hf needs transformers>=5.3 (pip install 'nemotron[hf]')") from err

    from nemotron.models.nano3.checkpoint import find_model_checkpoint, load_model_checkpoint
    from nemotron.models.nano3.hf import DEFAULT_MAX_SHARD_BYTES

    source, skipped = find_model_checkpoint(checkpoint)
    config, model = load_model_checkpoint(source)
    hf_tokenizer, origin, fields = None, None, {}
    if with_tokenizer:
        record = trained_tokenizer_record(source)
        hf_tokenizer, origin = load_tokenizer_for_export(tokenizer, record)
        if hf_tokenizer is None:
            raise HFInteropError(
                f"{source}: no tokenizer recorded for this checkpoint (no data-prep lineage); "
                "pass --tokenizer DIR|tokenizer.json|HUB_ID, or --no-tokenizer for weights only"
            )
        if len(hf_tokenizer) > config.vocab_size:
            raise HFInteropError(
                f"tokenizer {origin} has {len(hf_tokenizer)} tokens, more than the model's "
                f"vocab_size {config.vocab_size}"
            )
        fields = token_ids(hf_tokenizer, record)
        if fields["eos_token_id"] is not None and hf_tokenizer.eos_token_id != fields["eos_token_id"]:
            hf_tokenizer.eos_token = hf_tokenizer.convert_ids_to_tokens(fields["eos_token_id"])

    def write_extra(directory: Path) -> None:
        if hf_tokenizer is None:
            return
        hf_tokenizer.save_pretrained(str(directory))
        GenerationConfig(**fields).save_pretrained(str(directory))

    written = save_hf(
        model.state_dict(),
        config,
        out,
        dtype=dtype,
        max_shard_bytes=DEFAULT_MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes,
        overwrite=overwrite,
        config_fields=fields,
        write_extra=write_extra,
    )
    passed_over = tuple(f"{s.path}: {s.problem}" for s in skipped)
    return HFExport(checkpoint=source, out=written, tokenizer=origin, skipped=passed_over)
