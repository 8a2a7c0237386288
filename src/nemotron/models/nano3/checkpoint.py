"""Model weights in and out of `torch.distributed.checkpoint` (DCP) directories, for conversion.

Reads the training checkpoints written by `nemotron.train.checkpoint` (a DCP directory whose
`"model"` entry holds the model state, beside a `config.json` whose `"model"` section is the
architecture), or a save directory holding them (its latest complete checkpoint). Writes
model-only DCP checkpoints in the same layout (`"model"` state + `config.json`), which is what
`nemotron nano3 import hf` produces: no optimiser, loader or step state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from nemotron.models.nano3.config import ModelConfigError, Nano3Config
from nemotron.models.nano3.model import Nano3ForCausalLM
from nemotron.train.checkpoint import resolve_checkpoint
from nemotron.utils.fs import apply_default_modes

CONFIG_FILE = "config.json"
MODEL_KEY = "model"

# DCP warns on every call that it runs without a process group; conversion is single-process.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninit")


class ModelCheckpointError(ValueError):
    """A checkpoint directory that cannot be read as Nano3 model weights."""


def resolve_model_checkpoint(path: str | os.PathLike) -> Path:
    """A DCP checkpoint directory, or the latest complete checkpoint of a training save dir."""
    path = Path(path)
    if (path / ".metadata").is_file():
        return path
    if not path.exists():
        raise ModelCheckpointError(f"{path}: does not exist")
    try:  # a training save dir: its latest complete checkpoint
        found = resolve_checkpoint(path, must_exist=False)
    except Exception as err:  # the training package's own precise error
        raise ModelCheckpointError(str(err)) from err
    if found is not None:
        return Path(found)
    raise ModelCheckpointError(f"{path}: no DCP checkpoint (.metadata) found")


def config_from_checkpoint(checkpoint: str | os.PathLike) -> Nano3Config:
    """The architecture recorded in `config.json` beside the weights (its `model` section;
    parallel sizes and other sections are ignored)."""
    path = Path(checkpoint) / CONFIG_FILE
    if not path.is_file():
        raise ModelCheckpointError(f"{path}: not found; the model architecture is needed to read the weights")
    try:
        section = json.loads(path.read_text())[MODEL_KEY]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ModelCheckpointError(f"{path}: expected a JSON object with a 'model' section ({err})") from err
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
        dcp.load(state, checkpoint_id=str(checkpoint))
    except Exception as err:  # DCP raises assorted errors for missing keys or foreign files
        raise ModelCheckpointError(f"{checkpoint}: cannot read the model weights: {err}") from err
    model.load_state_dict(state[MODEL_KEY])
    return config, model


def save_model_checkpoint(
    model, config: Nano3Config, out: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write a model-only DCP checkpoint (written to a temporary sibling, then renamed)."""

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        dcp.save({MODEL_KEY: model.state_dict()}, checkpoint_id=str(tmp))
        (tmp / CONFIG_FILE).write_text(json.dumps({MODEL_KEY: dataclasses.asdict(config)}, indent=2) + "\n")
        apply_default_modes(tmp)  # mkdtemp made it 0700
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
