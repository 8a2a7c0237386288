"""Model weights in and out of `torch.distributed.checkpoint` (DCP) directories, for conversion.

Reads the training checkpoints written by `nemotron.train.checkpoint` (a DCP directory whose
`"model"` entry holds the model state, beside a `config.json` whose `"model"` section is the
architecture), or a save directory holding them (its newest intact checkpoint), after checking
the files against the checkpoint's `manifest.json`. Writes model-only DCP checkpoints in the
same layout (`"model"` state + `config.json` + `manifest.json`), which is what
`nemotron nano3 import hf` produces: no optimiser, loader or step state (a run starts from one
with `checkpoint.finetune=true`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from nemotron.models.nano3.config import ModelConfigError, Nano3Config
from nemotron.models.nano3.model import Nano3ForCausalLM
from nemotron.train.checkpoint import (
    MANIFEST_FILE,
    TRAIN_STATE_FILE,
    CheckpointError,
    CheckpointWriteError,
    check_model_shapes,
    describe_files,
    failure_reason,
    find_checkpoint,
    manifest_json,
)
from nemotron.utils.fs import (
    apply_default_modes,
    atomic_write_text,
    free_space_note,
    publish_dir,
    refuse_non_empty,
    temporary_dir,
)

CONFIG_FILE = "config.json"
MODEL_KEY = "model"

# DCP warns on every call that it runs without a process group; conversion is single-process.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninit")


class ModelCheckpointError(ValueError):
    """A checkpoint directory that cannot be read as Nano3 model weights."""


def find_model_checkpoint(path: str | os.PathLike) -> tuple[Path, list]:
    """(the checkpoint, the damaged ones passed over): `path` itself when it is a checkpoint, or
    the newest intact checkpoint of a training save dir (`latest`'s target first). Either way
    its files are checked against its `manifest.json` first (`find_checkpoint`), so a
    half-written (`.tmp-*`, no manifest), truncated or altered checkpoint is an error naming
    the file, never read."""
    path = Path(path)
    if not path.exists():
        raise ModelCheckpointError(f"{path}: does not exist")
    if not path.is_dir():
        raise ModelCheckpointError(f"{path}: not a directory (a checkpoint or a save dir is)")
    try:
        found, skipped = find_checkpoint(path, must_exist=False)
    except CheckpointError as err:  # the training package's own precise error
        raise ModelCheckpointError(str(err)) from None
    if found is None:
        raise ModelCheckpointError(f"{path}: no checkpoint (iter_N directory or .metadata) found")
    return found, skipped


def resolve_model_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or the newest intact checkpoint of a training save dir, verified
    against its manifest (`find_model_checkpoint`)."""
    return find_model_checkpoint(path)[0]


def config_from_checkpoint(checkpoint: str | os.PathLike) -> Nano3Config:
    """The architecture recorded in `config.json` beside the weights (its `model` section;
    parallel sizes and other sections are ignored)."""
    path = Path(checkpoint) / CONFIG_FILE
    if not path.is_file():
        raise ModelCheckpointError(f"{path}: not found; the model architecture is needed to read the weights")
    try:
        section = json.loads(path.read_text())[MODEL_KEY]
        if not isinstance(section, dict):
            raise TypeError(f"'model' is a {type(section).__name__}, not an object")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ModelCheckpointError(f"{path}: expected a JSON object with a 'model' section ({err})") from None
    names = {f.name for f in dataclasses.fields(Nano3Config)}
    try:
        return Nano3Config(**{k: v for k, v in section.items() if k in names})
    except (ModelConfigError, TypeError) as err:
        raise ModelCheckpointError(f"{path}: model section: {err}") from err


def load_model_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """-> (Nano3Config, Nano3ForCausalLM with the checkpoint's weights, float32)."""
    checkpoint = resolve_model_checkpoint(path)
    config = config_from_checkpoint(checkpoint)
    with torch.device("meta"):
        model = Nano3ForCausalLM(config)
    model.to_empty(device=device)
    model.reset_parameters()
    state = {MODEL_KEY: model.state_dict()}
    try:
        # config.json's architecture against the weights' shapes: every mismatch named
        check_model_shapes(checkpoint, state[MODEL_KEY])
        dcp.load(state, checkpoint_id=str(checkpoint))
    except CheckpointError as err:
        raise ModelCheckpointError(f"{err} (architecture from {checkpoint / CONFIG_FILE})") from None
    except (Exception, CheckpointException) as err:  # DCP's own is a BaseException
        raise ModelCheckpointError(
            f"{checkpoint}: cannot read the model weights: {failure_reason(err)}"
        ) from None
    model.load_state_dict(state[MODEL_KEY])
    return config, model


def not_a_model_checkpoint(out: Path) -> str | None:
    """None when the directory `out` is a model-only checkpoint (a config.json holding only
    "model", as `save_model_checkpoint` writes), which `overwrite` may replace; otherwise why
    not. A training checkpoint (its optimiser and loader state), a run or a data directory
    given as OUT by mistake is never deleted."""
    if (out / TRAIN_STATE_FILE).exists():
        return f"is a training checkpoint (holds {TRAIN_STATE_FILE}), not an earlier model checkpoint"
    path = out / CONFIG_FILE
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return f"is not an earlier model checkpoint (holds no {CONFIG_FILE})"
    except (OSError, ValueError):  # unreadable, not JSON
        raw = None
    if not isinstance(raw, dict) or set(raw) != {MODEL_KEY}:
        return f"is not an earlier model checkpoint (its {CONFIG_FILE} is not one's)"
    return None


def save_model_checkpoint(
    model, config: Nano3Config, out: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write a model-only DCP checkpoint (written to a temporary sibling, then renamed).
    `overwrite` replaces only an earlier model-only checkpoint (`not_a_model_checkpoint`)."""

    out = Path(out)
    refuse_non_empty(out, overwrite, not_a_model_checkpoint)
    tmp = temporary_dir(out)  # (what killed writers of `out` left there goes first)
    try:
        try:
            dcp.save({MODEL_KEY: model.state_dict()}, checkpoint_id=str(tmp))
            text = json.dumps({MODEL_KEY: dataclasses.asdict(config)}, indent=2) + "\n"
            (tmp / CONFIG_FILE).write_text(text)
            # sizes and checksums, as a training checkpoint has: verified before every load
            atomic_write_text(tmp / MANIFEST_FILE, manifest_json(describe_files(tmp), step=None))
        except (Exception, CheckpointException) as err:  # DCP's own is a BaseException
            raise CheckpointWriteError(
                f"{out}: the checkpoint could not be written: {failure_reason(err)}"
                f"{free_space_note(out.parent)}"
            ) from None
        apply_default_modes(tmp)  # made 0700
        publish_dir(tmp, out)  # an earlier out goes only once this one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
