import json

import pytest

from nemotron.artifacts.model import (
    MODEL_ARTIFACT_KIND,
    ArtifactError,
    build_model_artifact,
    data_artifact_record,
    read_model_artifact,
    write_model_artifact,
)


def test_manifest_records_the_data_artifact(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "blend.json").write_text(json.dumps({"train": ["1", "/x/shard_0"]}))
    (data / "metadata.json").write_text(json.dumps({"kind": "DataBlendsArtifact-pretrain", "docs": 3}))
    record = data_artifact_record(data / "blend.json")
    assert record["content"] == {"kind": "DataBlendsArtifact-pretrain", "docs": 3}
    assert record["metadata"] == str(data / "metadata.json") and len(record["metadata_sha256"]) == 64

    ckpt = tmp_path / "iter_0000010"
    ckpt.mkdir()
    manifest = build_model_artifact(step=10, tokens=640, model_config={"num_layers": 4}, data=record, phase=1)
    write_model_artifact(ckpt, manifest)
    read = read_model_artifact(ckpt)
    assert read["kind"] == MODEL_ARTIFACT_KIND and read["step"] == 10
    assert read["data"]["metadata_sha256"] == record["metadata_sha256"]
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]  # no temp file left


def test_blend_without_metadata_and_bad_manifests(tmp_path):
    (tmp_path / "blend.json").write_text("{}")
    assert data_artifact_record(tmp_path / "blend.json")["metadata"] is None
    assert data_artifact_record(None) is None
    with pytest.raises(ArtifactError, match="does not exist"):
        read_model_artifact(tmp_path)
    (tmp_path / "ModelArtifact-pretrain.json").write_text('{"kind": "other"}')
    with pytest.raises(ArtifactError, match="kind 'other'"):
        read_model_artifact(tmp_path)
    (tmp_path / "metadata.json").write_text("{broken")
    with pytest.raises(ArtifactError, match="metadata.json is not valid JSON"):
        data_artifact_record(tmp_path / "blend.json")


@pytest.mark.parametrize("text", [b"[1, 2]", b"\xff\xfe", b'"a string"'], ids=["list", "not-utf8", "string"])
def test_a_manifest_that_is_not_a_json_object_is_named(tmp_path, text):
    (tmp_path / "ModelArtifact-pretrain.json").write_bytes(text)
    with pytest.raises(ArtifactError, match=r"ModelArtifact-pretrain\.json"):
        read_model_artifact(tmp_path)


def test_recorded_hashes_are_those_of_the_files_and_a_non_utf8_metadata_is_named(tmp_path):
    import hashlib

    (tmp_path / "blend.json").write_bytes(b'{"train": ["1", "shard"]}')
    (tmp_path / "metadata.json").write_bytes(b'{"fingerprint": "ab", "note": "caf\xc3\xa9"}')
    record = data_artifact_record(tmp_path / "blend.json")
    for key, name in (("blend_sha256", "blend.json"), ("metadata_sha256", "metadata.json")):
        assert record[key] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    assert record["content"]["note"] == "café"
    (tmp_path / "metadata.json").write_bytes(b'{"fingerprint": "\xff"}')
    with pytest.raises(ArtifactError, match="metadata.json is not valid JSON"):
        data_artifact_record(tmp_path / "blend.json")
