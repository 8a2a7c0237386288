"""The W&B artifacts of data prep, built and logged with the real `wandb` package (offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from train.conftest import TINY_MODEL  # the training tests' tiny model (tests/ is on the path)

from nemotron.artifacts.model import MODEL_ARTIFACT_FILE, ArtifactError
from nemotron.config.schema import ModelConfig, PretrainConfig
from nemotron.data.config import DataConfig
from nemotron.data.indexed import IndexedDatasetWriter
from nemotron.train.config import (
    CheckpointConfig,
    LoggerConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainConfig,
)

from .wandb_records import artifact_records

wandb = pytest.importorskip("wandb")
from nemotron.artifacts import wandb_lineage  # noqa: E402


def write_output(root, fingerprint="ab" * 32):
    """A data-prep output: train shards (absolute and relative prefixes), valid, blend.json and
    metadata.json."""
    (root / "train").mkdir(parents=True)
    (root / "valid").mkdir()
    for name in ("train/data_00000", "train/data_00001", "valid/data_00000"):
        with IndexedDatasetWriter(root / name, np.uint16) as writer:
            for k in range(5):
                writer.add_document((np.arange(40) * (k + 1)) % 63 + 1)
    blend = {
        "train": ["0.6", str(root / "train/data_00000"), "0.4", "train/data_00001"],
        "valid": ["1.0", str(root / "valid/data_00000")],
    }
    (root / "blend.json").write_text(json.dumps(blend))
    (root / "metadata.json").write_text(
        json.dumps(
            {
                "type": "DataBlendsArtifact-pretrain",
                "fingerprint": fingerprint,
                "format_version": 1,
                "tokenizer": {"model": "bpe"},
                "counts": {"train": {"tokens": 16}},
                "sources": [{"name": "web", "path": "/raw/web", "weight": 1.0}],
            }
        )
    )
    return root / "blend.json"


def entries(artifact):
    return {path: (entry.ref, entry.digest) for path, entry in artifact.manifest.entries.items()}


def test_data_artifact_references_every_shard_and_the_blend(tmp_path):
    blend = write_output(tmp_path / "out")
    artifact = wandb_lineage.data_blends_artifact(blend)
    assert artifact.name == "DataBlendsArtifact-pretrain" and artifact.type == "dataset"
    found = entries(artifact)
    expected_refs = {
        f"{s}/data_0000{k}.{x}" for s, k in (("train", 0), ("train", 1), ("valid", 0)) for x in ("bin", "idx")
    } | {"blend.json"}
    assert {p for p, (ref, _) in found.items() if ref} == expected_refs
    for path in expected_refs:
        assert found[path][0] == (tmp_path / "out" / path).as_uri()
    assert found["metadata.json"][0] is None  # the metadata itself is stored, by content
    assert artifact.metadata["fingerprint"] == "ab" * 32
    assert artifact.metadata["datasets"] == [
        {"name": "web", "path": "/raw/web", "subset": None, "revision": None, "weight": 1.0}
    ]
    # Rebuilt from the same files: the same digest, so W&B resolves it to the same version.
    assert wandb_lineage.data_blends_artifact(blend).digest == artifact.digest
    # Another fingerprint (new data at the same paths) is another version.
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    (tmp_path / "out" / "metadata.json").write_text(json.dumps({**metadata, "fingerprint": "cd" * 32}))
    assert wandb_lineage.data_blends_artifact(blend).digest != artifact.digest


@pytest.mark.parametrize(
    "form",
    [
        # One blend for every split (Megatron's --data-path, cut by data.split), as a list and
        # as one string; and a per-split file of prefixes without weights, whose even length
        # once read as weight, prefix pairs (only every second shard referenced).
        ["0.6", "train/data_00000", "0.4", "train/data_00001", "1", "valid/data_00000"],
        "train/data_00000 train/data_00001 valid/data_00000",
        {"train": ["train/data_00000", "train/data_00001"], "valid": ["valid/data_00000"], "test": []},
    ],
)
def test_data_artifact_references_the_shards_of_every_blend_form(tmp_path, form):
    blend = write_output(tmp_path / "out")
    blend.write_text(json.dumps(form))
    found = entries(wandb_lineage.data_blends_artifact(blend))
    assert {p for p, (ref, _) in found.items() if ref} == {
        f"{s}/data_0000{k}.{x}" for s, k in (("train", 0), ("train", 1), ("valid", 0)) for x in ("bin", "idx")
    } | {"blend.json"}


def test_data_artifact_errors_name_the_file(tmp_path):
    blend = write_output(tmp_path / "out")
    (tmp_path / "out" / "valid" / "data_00000.idx").unlink()
    with pytest.raises(
        ArtifactError, match=r"blend.json: valid\[1\] names .*valid/data_00000.*\.idx does not"
    ):
        wandb_lineage.data_blends_artifact(blend)
    (tmp_path / "out" / "metadata.json").unlink()
    with pytest.raises(ArtifactError, match=r"data-prep metadata .*metadata.json does not exist"):
        wandb_lineage.data_blends_artifact(blend)
    with pytest.raises(ArtifactError, match="mode 'sometimes'"):
        wandb_lineage.start_run(
            job_dir=tmp_path / "job", job_type="x", project=None, entity=None, mode="sometimes"
        )


def test_record_data_prep_offline_writes_the_artifact_for_sync(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    blend = write_output(tmp_path / "out")
    logged = wandb_lineage.record_data_prep(
        blend,
        job_dir=tmp_path / "job",
        project="nemotron-test",
        entity=None,
        mode="offline",
        config={"num_shards": 2},
    )
    assert logged["artifact"] == f"DataBlendsArtifact-pretrain:fp-{'ab' * 8}"
    (run_dir,) = (tmp_path / "job" / "wandb").glob("offline-run-*")
    assert logged["run_dir"] == str(run_dir)
    (record,) = artifact_records(run_dir)
    assert record.name == "DataBlendsArtifact-pretrain" and record.type == "dataset"
    assert set(record.aliases) == {"latest", f"fp-{'ab' * 8}"} and not record.use_after_commit
    assert record.digest == wandb_lineage.data_blends_artifact(blend).digest
    refs = {e.path: e.ref for e in record.manifest.contents}
    assert refs["train/data_00001.bin"] == (tmp_path / "out/train/data_00001.bin").as_uri()
    assert json.loads(record.metadata)["fingerprint"] == "ab" * 32


def tiny_pretrain_config(tmp_path, blend) -> PretrainConfig:
    return PretrainConfig(
        model=ModelConfig(**TINY_MODEL),
        train=TrainConfig(
            train_iters=2,
            global_batch_size=2,
            micro_batch_size=2,
            seq_length=16,
            eval_iters=0,
            precision="fp32",
            device="cpu",
        ),
        optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-4),
        scheduler=SchedulerConfig(warmup_tokens=16),
        checkpoint=CheckpointConfig(save=str(tmp_path / "ckpt"), save_interval=1),
        logger=LoggerConfig(
            progress_bar=False, wandb=True, wandb_mode="offline", wandb_project="nemotron-test"
        ),
        data=DataConfig(blend=str(blend), cache_dir=str(tmp_path / "cache")),
    )


def test_pretrain_uses_the_data_artifact_and_logs_each_checkpoint(tmp_path, monkeypatch):
    """Lineage data -> model in the records an offline pretraining run leaves for `wandb sync`:
    the data artifact as input (the same digest data prep logged, flagged use-after-commit)
    and one ModelArtifact-pretrain per saved checkpoint."""
    from nemotron.train import pretrain

    monkeypatch.setenv("WANDB_SILENT", "true")
    blend = write_output(tmp_path / "out")
    prep = wandb_lineage.record_data_prep(
        blend, job_dir=tmp_path / "prep", project="nemotron-test", entity=None, mode="offline"
    )
    (prep_record,) = artifact_records(prep["run_dir"])
    events = []
    pretrain(
        tiny_pretrain_config(tmp_path, blend),
        tmp_path / "job",
        on_event=lambda kind, payload: events.append((kind, payload)),
    )
    assert not [e for e in events if e[0] == "warning"]
    (run_dir,) = (tmp_path / "job" / "wandb").glob("offline-run-*")
    data_record, *model_records = artifact_records(run_dir)
    assert data_record.name == "DataBlendsArtifact-pretrain" and data_record.use_after_commit
    assert data_record.digest == prep_record.digest
    assert f"fp-{'ab' * 8}" in data_record.aliases

    checkpoints = sorted(p for p in (tmp_path / "ckpt").iterdir() if p.is_dir())
    assert [p.name for p in checkpoints] == ["iter_0000001", "iter_0000002"]
    assert [r.name for r in model_records] == ["ModelArtifact-pretrain"] * 2
    for record, checkpoint, step in zip(model_records, checkpoints, (1, 2)):
        assert record.type == "model" and not record.use_after_commit
        assert set(record.aliases) == {"latest", f"step-{step}"}
        metadata = json.loads(record.metadata)
        assert metadata["step"] == step and metadata["data_fingerprint"] == "ab" * 32
        assert metadata["checkpoint"] == str(checkpoint)
        contents = {e.path: e.ref for e in record.manifest.contents}
        assert contents[MODEL_ARTIFACT_FILE] == ""  # stored by content
        assert f"checkpoint/{MODEL_ARTIFACT_FILE}" in contents
        assert all(
            ref.startswith(checkpoint.as_uri())
            for path, ref in contents.items()
            if path.startswith("checkpoint/")
        )


def test_a_blend_without_prep_metadata_is_a_warning_not_a_failure(tmp_path, monkeypatch):
    from nemotron.train.metrics import MetricsLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    blend = write_output(tmp_path / "out")
    (tmp_path / "out" / "metadata.json").unlink()  # a hand-written blend
    events = []
    metrics = MetricsLogger(
        tmp_path / "job",
        LoggerConfig(wandb=True, wandb_mode="offline"),
        on_event=lambda kind, payload: events.append((kind, payload)),
    )
    try:
        metrics.use_data_artifacts([str(blend), None, str(blend)])
    finally:
        metrics.close()
    assert [kind for kind, _ in events] == ["warning"]  # once per distinct blend
    assert "metadata.json does not exist" in events[0][1]["message"]
