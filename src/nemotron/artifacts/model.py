"""`ModelArtifact-pretrain`: the lineage manifest written beside every pretraining checkpoint.

It records what the checkpoint is (step, tokens, model config) and which data artifact it was
trained on: the `metadata.json` that data prep writes beside each `blend.json` (a
`DataBlendsArtifact-pretrain`), identified by path and SHA-256 and copied in full, so lineage
survives the data directory being moved or rewritten.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any

from nemotron.utils.fs import atomic_write_text

MODEL_ARTIFACT_KIND = "ModelArtifact-pretrain"
MODEL_ARTIFACT_FILE = "ModelArtifact-pretrain.json"
DATA_METADATA_FILE = "metadata.json"


class ArtifactError(ValueError):
    """A manifest or data artifact file that cannot be read."""


def data_artifact_record(blend_json: str | Path | None) -> dict[str, Any] | None:
    """The data artifact a blend belongs to: its metadata.json (path, sha256, content).

    Returns a record with `metadata: None` when the blend has no metadata.json beside it (a
    hand-written blend), and None when there is no blend at all (mock data).
    """
    if blend_json is None:
        return None
    blend = Path(blend_json).resolve()
    record: dict[str, Any] = {"blend": str(blend), "blend_sha256": _sha256(blend)}
    meta = blend.parent / DATA_METADATA_FILE
    if meta.exists():
        # One read: the hash recorded is that of the very bytes whose content is copied.
        raw = meta.read_bytes()
        try:
            content = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"data artifact {meta} is not valid JSON: {e}") from None
        record.update(metadata=str(meta), metadata_sha256=hashlib.sha256(raw).hexdigest(), content=content)
    else:
        record.update(metadata=None)
    return record


def _sha256(path: Path) -> str | None:
    if not path.exists():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_model_artifact(
    *,
    step: int,
    tokens: int,
    model_config: dict[str, Any],
    data: dict[str, Any] | None,
    phase: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a checkpoint (written into it as MODEL_ARTIFACT_FILE)."""
    return {
        "kind": MODEL_ARTIFACT_KIND,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "step": step,
        "tokens": tokens,
        "phase": phase,
        "model_config": model_config,
        "data": data,
        **(extra or {}),
    }


def write_model_artifact(checkpoint_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write `ModelArtifact-pretrain.json` into `checkpoint_dir` (temp name, then rename)."""
    path = Path(checkpoint_dir) / MODEL_ARTIFACT_FILE
    return atomic_write_text(path, manifest_json(manifest))


def read_model_artifact(checkpoint_dir: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / MODEL_ARTIFACT_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist: not a pretraining checkpoint") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("kind") != MODEL_ARTIFACT_KIND:
        raise ArtifactError(f"{path}: kind {manifest.get('kind')!r} is not {MODEL_ARTIFACT_KIND!r}")
    return manifest


def manifest_json(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True, default=str)
