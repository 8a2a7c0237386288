"""W&B artifacts for the lineage data -> model (`DataBlendsArtifact-pretrain` -> pretraining ->
`ModelArtifact-pretrain`), beside the local JSON manifests of `artifacts/model.py`.

- Data prep logs `DataBlendsArtifact-pretrain` (type `dataset`): `metadata.json` itself (a
  small file, by content), a reference to `blend.json` (checksummed) and a reference to every
  `.bin`/`.idx` file the blend names (by path only: hashing terabytes of shards is not done;
  their content is identified by the data-prep fingerprint, which is in `metadata.json` and the
  artifact's metadata). Aliases `latest` and `fp-<first 16 hex of the fingerprint>`.
- Pretraining declares that artifact as its input and logs `ModelArtifact-pretrain` (type
  `model`) for every checkpoint it saves: the checkpoint's `ModelArtifact-pretrain.json` (by
  content) and a reference to the checkpoint directory, aliases `latest` and `step-<N>`.

The pretraining run rebuilds the data artifact from the same files, so it has the same digest
as the one data prep logged and W&B resolves it to that version (no lookup by name is needed,
which is what lets lineage work offline). W&B's `use_artifact` refuses offline runs; offline,
the run logs the artifact with W&B's "use after commit" flag instead (what `use_artifact` does
with such an artifact online), which `wandb sync` replays: the input edge appears on sync.
References are paths: an artifact synced on another machine still names the original paths.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nemotron.artifacts.model import (
    DATA_METADATA_FILE,
    MODEL_ARTIFACT_FILE,
    ArtifactError,
    read_model_artifact,
)

DATA_ARTIFACT_NAME = "DataBlendsArtifact-pretrain"
DATA_ARTIFACT_TYPE = "dataset"
MODEL_ARTIFACT_NAME = "ModelArtifact-pretrain"
MODEL_ARTIFACT_TYPE = "model"
DEFAULT_PROJECT = "nemotron"
WANDB_MODES = ("online", "offline", "disabled")


class WandbUnavailable(ArtifactError):
    """W&B was asked for but the `wandb` package is not installed."""


def _wandb():
    try:
        import wandb
    except ImportError as e:
        raise WandbUnavailable(
            "W&B logging needs wandb: pip install 'nemotron[wandb]' (or turn it off: "
            "logger.wandb=false for pretraining, wandb=false for data prep)"
        ) from e
    return wandb


def start_run(
    *,
    job_dir: str | Path,
    job_type: str,
    project: str | None,
    entity: str | None,
    mode: str,
    config: dict[str, Any] | None = None,
):
    """A W&B run for one job directory: id and name are the job dir's name (unique, and the
    same run again when a job resumes), its files under `<job dir>/wandb/`. The project is
    `project`, else $WANDB_PROJECT (what env.toml's [wandb] exports to jobs), else 'nemotron'."""
    if mode not in WANDB_MODES:
        raise ArtifactError(f"W&B mode {mode!r} is not one of {WANDB_MODES}")
    wandb = _wandb()
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
        entity=entity or None,
        mode=mode,
        dir=str(job_dir),
        config=config,
        job_type=job_type,
        name=job_dir.name,
        id=job_dir.name,
        resume="allow",
    )


# ---------------------------------------------------------------------------------------------
# DataBlendsArtifact-pretrain


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{what} {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{what} {path} cannot be read: {e}") from None


def _blend_prefixes(blend_path: Path, blend: Any) -> list[Path]:
    """Every prefix a blend file names, as training reads and resolves them (`read_blend`, the
    one reader: weighted or not, a list or one string, beside the blend file first): a per-split
    file's in split then entry order, a file of one blend for every split (Megatron's
    `--data-path`, cut by data.split) its entries."""
    from nemotron.data.gpt_dataset import SPLITS, GPTDatasetError, is_single_blend, read_blend

    if is_single_blend(blend):
        splits: list[str] = ["train"]  # read_blend gives the one blend for every split
    elif isinstance(blend, dict):
        splits = [s for s in SPLITS if blend.get(s) not in (None, [], "")]  # `"valid": []`: none
    else:
        raise ArtifactError(f"blend file {blend_path} is neither an object of splits nor one blend")
    prefixes: list[Path] = []
    for split in splits:
        try:
            _, names = read_blend(blend_path, split)
        except GPTDatasetError as e:
            raise ArtifactError(str(e)) from None
        for name in names:
            prefix = Path(name).absolute()
            if prefix not in prefixes:
                prefixes.append(prefix)
    return prefixes


def data_artifact_metadata(metadata: dict[str, Any], blend_path: Path) -> dict[str, Any]:
    """What the W&B artifact shows about the data (the full record is metadata.json in it)."""
    return {
        "fingerprint": metadata.get("fingerprint"),
        "format_version": metadata.get("format_version"),
        "blend": str(blend_path),
        "blend_definition": metadata.get("blend_definition"),
        "tokenizer": metadata.get("tokenizer"),
        "dtype": metadata.get("dtype"),
        "counts": metadata.get("counts"),
        "datasets": [
            {k: s.get(k) for k in ("name", "path", "subset", "revision", "weight")}
            for s in metadata.get("sources", [])
            if isinstance(s, dict)
        ],
    }


def data_blends_artifact(blend_json: str | Path):
    """The `DataBlendsArtifact-pretrain` of a data-prep output, built from its files.

    Building it twice from unchanged files gives the same digest (the same W&B version).
    Raises ArtifactError when blend.json, metadata.json or a named shard is missing.
    """
    wandb = _wandb()
    blend_path = Path(blend_json).absolute()
    blend = _read_json(blend_path, "blend file")
    metadata_path = blend_path.parent / DATA_METADATA_FILE
    metadata = _read_json(metadata_path, "data-prep metadata")
    if not isinstance(metadata, dict) or "fingerprint" not in metadata:
        raise ArtifactError(f"data-prep metadata {metadata_path} has no fingerprint")
    artifact = wandb.Artifact(
        DATA_ARTIFACT_NAME,
        type=DATA_ARTIFACT_TYPE,
        description="Tokenized pretraining blend: Megatron bin/idx shards and blend.json",
        metadata=data_artifact_metadata(metadata, blend_path),
    )
    artifact.add_file(str(metadata_path), name=DATA_METADATA_FILE)
    artifact.add_reference(blend_path.as_uri(), name=blend_path.name, checksum=True)
    root = blend_path.parent
    for prefix in _blend_prefixes(blend_path, blend):
        for suffix in (".bin", ".idx"):
            path = Path(str(prefix) + suffix)
            if not path.is_file():
                raise ArtifactError(f"blend file {blend_path} names {prefix} but {path} does not exist")
            try:
                name = path.relative_to(root).as_posix()
            except ValueError:  # a shard outside the output directory: its absolute path
                name = path.as_posix().lstrip("/")
            artifact.add_reference(path.as_uri(), name=name, checksum=False)
    return artifact


def fingerprint_alias(artifact) -> str:
    return f"fp-{str(artifact.metadata.get('fingerprint'))[:16]}"


def log_data_artifact(run, blend_json: str | Path):
    """Log a data-prep output as this run's output `DataBlendsArtifact-pretrain`."""
    artifact = data_blends_artifact(blend_json)
    run.log_artifact(artifact, aliases=["latest", fingerprint_alias(artifact)])
    return artifact


def use_data_artifact(run, blend_json: str | Path):
    """Declare a data-prep output as this run's input (online or offline; see the module doc)."""
    artifact = data_blends_artifact(blend_json)
    aliases = [fingerprint_alias(artifact)]
    if run.offline:
        # W&B's use_artifact raises in offline mode. For an artifact built here it would log
        # it with use_after_commit=True and wait for the server; offline, the same record is
        # written to the run file and `wandb sync` performs the use after the commit.
        run._log_artifact(artifact, aliases=aliases, is_user_created=True, use_after_commit=True)
    else:
        run.use_artifact(artifact, aliases=aliases)
    return artifact


# ---------------------------------------------------------------------------------------------
# ModelArtifact-pretrain


def model_artifact(checkpoint_dir: str | Path):
    """The `ModelArtifact-pretrain` of one saved checkpoint (its manifest must be in it)."""
    wandb = _wandb()
    checkpoint_dir = Path(checkpoint_dir).absolute()
    manifest = read_model_artifact(checkpoint_dir)
    data = manifest.get("data") or {}
    content = data.get("content") or {}
    artifact = wandb.Artifact(
        MODEL_ARTIFACT_NAME,
        type=MODEL_ARTIFACT_TYPE,
        description="Pretraining checkpoint (DCP) with its lineage manifest",
        metadata={
            "checkpoint": str(checkpoint_dir),
            "step": manifest.get("step"),
            "tokens": manifest.get("tokens"),
            "phase": manifest.get("phase"),
            "model_config": manifest.get("model_config"),
            "data_blend": data.get("blend"),
            "data_fingerprint": content.get("fingerprint"),
        },
    )
    artifact.add_file(str(checkpoint_dir / MODEL_ARTIFACT_FILE), name=MODEL_ARTIFACT_FILE)
    artifact.add_reference(checkpoint_dir.as_uri(), name="checkpoint", checksum=False)
    return artifact


def log_model_artifact(run, checkpoint_dir: str | Path):
    artifact = model_artifact(checkpoint_dir)
    run.log_artifact(artifact, aliases=["latest", f"step-{artifact.metadata['step']}"])
    return artifact


# ---------------------------------------------------------------------------------------------
# One call per stage


def require_wandb() -> None:
    """Raise WandbUnavailable now (before hours of work) if W&B cannot be imported."""
    _wandb()


def record_data_prep(
    blend_json: str | Path,
    *,
    job_dir: str | Path,
    project: str | None,
    entity: str | None,
    mode: str,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Log a finished data-prep output as `DataBlendsArtifact-pretrain` from a W&B run of its
    own (job type `data-prep`, files under `<job dir>/wandb/`). Returns what to tell the user:
    the artifact name and alias, the mode, and the run directory (`wandb sync` it if offline)."""
    run = start_run(
        job_dir=job_dir, job_type="data-prep", project=project, entity=entity, mode=mode, config=config
    )
    try:
        artifact = log_data_artifact(run, blend_json)
        run_dir = str(Path(run.dir).parent) if getattr(run, "dir", None) else None
    finally:
        run.finish()
    return {
        "artifact": f"{DATA_ARTIFACT_NAME}:{fingerprint_alias(artifact)}",
        "mode": mode,
        "run_dir": run_dir,
    }
