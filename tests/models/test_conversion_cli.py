"""`nemotron nano3 export hf` / `import hf` on a checkpoint written by the training checkpointer."""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from nemotron.models.nano3 import Nano3ForCausalLM
from nemotron.models.nano3.checkpoint import ModelCheckpointError, load_model_checkpoint

pytest.importorskip("transformers")
train_checkpoint = pytest.importorskip("nemotron.train.checkpoint")
cli_main = pytest.importorskip("nemotron.cli.main")
schema = pytest.importorskip("nemotron.config.schema")


def training_checkpoint(tmp_path, config):
    """A checkpoint as `nemotron nano3 pretrain` writes it (model + optimizer + run config)."""
    model = Nano3ForCausalLM(config)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.router.expert_bias.uniform_(-0.01, 0.01)
    optimizer = torch.optim.AdamW(model.parameters())
    run_config = schema.PretrainConfig(model=schema.ModelConfig(**dataclasses.asdict(config)))
    saver = train_checkpoint.Checkpointer(tmp_path / "save")
    saver.save(
        7,
        model,
        optimizer,
        {"step": 7, "tokens": 0},
        files={"config.json": json.dumps(dataclasses.asdict(run_config), default=str)},
    )
    return model.eval()


def run(*args):
    result = CliRunner().invoke(cli_main.app, [str(a) for a in args])
    return result.exit_code, result.output


def test_export_then_import_round_trip(tmp_path, config):
    from transformers import NemotronHForCausalLM

    model = training_checkpoint(tmp_path, config)
    # No data-prep lineage in this checkpoint, so no tokenizer to include (test_hf_export.py
    # covers the tokenizer).
    code, out = run(
        "nano3", "export", "hf", tmp_path / "save", tmp_path / "hf", "--dtype", "fp32", "--no-tokenizer"
    )
    assert code == 0, out
    hf = NemotronHForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (1, 8))
    with torch.no_grad():
        reference = model(ids).logits
        torch.testing.assert_close(hf(ids).logits, reference, rtol=1e-5, atol=1e-5)

    code, out = run("nano3", "import", "hf", tmp_path / "hf", tmp_path / "imported")
    assert code == 0, out
    loaded_config, loaded = load_model_checkpoint(tmp_path / "imported")
    assert loaded_config == config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # and the imported checkpoint exports again
    code, out = run("nano3", "export", "hf", tmp_path / "imported", tmp_path / "hf2", "--no-tokenizer")
    assert code == 0, out
    # --overwrite replaces the command's own earlier output (an export, an import) ...
    code, out = run(
        "nano3", "export", "hf", tmp_path / "imported", tmp_path / "hf", "--overwrite", "--no-tokenizer"
    )
    assert code == 0, out
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    code, out = run("nano3", "import", "hf", tmp_path / "hf2", tmp_path / "imported", "--overwrite")
    assert code == 0, out
    # ... never another's: the training run's checkpoint as the import's OUT, an export's as
    # the export's (exit 2, untouched)
    trained = next((tmp_path / "save").glob("iter_*"))
    before = {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()}
    code, out = run("nano3", "import", "hf", tmp_path / "hf", trained, "--overwrite")
    assert code == 2 and "is a training checkpoint (holds train_state.json)" in out, out
    code, out = run("nano3", "export", "hf", tmp_path / "imported", tmp_path / "save", "--overwrite")
    assert code == 2 and "is not an earlier export (holds no config.json)" in out, out
    assert {p: p.read_bytes() for p in trained.rglob("*") if p.is_file()} == before


def test_cli_errors_are_one_line(tmp_path, config):
    code, out = run("nano3", "export", "hf", tmp_path / "nothing", tmp_path / "hf")
    assert code == 1 and out.startswith("error:") and "does not exist" in out
    training_checkpoint(tmp_path, config)
    code, out = run("nano3", "export", "hf", tmp_path / "save", tmp_path / "hf", "--dtype", "int8")
    assert code == 2 and "--dtype" in out
    code, out = run("nano3", "import", "hf", tmp_path / "save", tmp_path / "x")
    assert code == 1 and ("nemotron_h" in out or "config.json" in out)


def test_missing_config_is_named(tmp_path, config):
    training_checkpoint(tmp_path, config)
    (tmp_path / "save" / "iter_0000007" / "config.json").unlink()
    with pytest.raises(ModelCheckpointError, match="config.json is missing"):
        load_model_checkpoint(tmp_path / "save")


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "how,pattern",
    [
        ("unfinished", r"\.tmp-iter_0000007/manifest\.json is missing"),  # a save killed mid-way
        ("altered", r"__0_0\.distcp does not match the SHA-256 in its manifest"),
        ("truncated", r"__0_0\.distcp has [\d,]+ bytes, its manifest says"),
    ],
)
def test_export_refuses_a_damaged_checkpoint_by_name(tmp_path, config, how, pattern):
    """Export checks the checkpoint against its manifest as resume does: before, an unfinished
    save was exported as if complete, an altered shard exported silently, and a truncated one
    escaped as DCP's CheckpointException (a BaseException: a traceback from the CLI)."""
    training_checkpoint(tmp_path, config)
    checkpoint = tmp_path / "save" / "iter_0000007"
    if how == "unfinished":
        (checkpoint / "manifest.json").unlink()
        checkpoint = checkpoint.rename(checkpoint.with_name(".tmp-iter_0000007"))
    elif how == "altered":
        _flip_a_byte(checkpoint / "__0_0.distcp")
    else:
        shard = checkpoint / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ModelCheckpointError, match=pattern):
        load_model_checkpoint(checkpoint)
    code, out = run("nano3", "export", "hf", checkpoint, tmp_path / "hf", "--no-tokenizer")
    assert code == 1 and out.startswith("error:") and len(out.strip().splitlines()) == 1, out
    assert str(checkpoint) in out and not (tmp_path / "hf").exists()


def test_export_of_a_save_dir_skips_a_damaged_newest_checkpoint_and_says_so(tmp_path, config):
    model = training_checkpoint(tmp_path, config)  # iter_0000007
    newer = Nano3ForCausalLM(config)
    train_checkpoint.Checkpointer(tmp_path / "save").save(
        9,
        newer,
        None,
        {"step": 9},
        files={"config.json": (tmp_path / "save" / "iter_0000007" / "config.json").read_text()},
    )
    _flip_a_byte(tmp_path / "save" / "iter_0000009" / "__0_0.distcp")
    code, out = run(
        "nano3", "export", "hf", tmp_path / "save", tmp_path / "hf", "--no-tokenizer", "--dtype", "fp32"
    )
    assert code == 0, out
    assert "warning: skipped damaged checkpoint" in out and "iter_0000009" in out and "SHA-256" in out
    from nemotron.models.nano3.hf import load_hf

    exported = load_hf(tmp_path / "hf")
    for name, tensor in model.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name


def test_export_names_every_parameter_config_json_disagrees_with(tmp_path, config):
    """A checkpoint whose config.json (with a manifest that agrees) describes another
    architecture: one error naming the mismatched parameters, not DCP's traceback."""
    training_checkpoint(tmp_path, config)
    checkpoint = tmp_path / "save" / "iter_0000007"
    path = checkpoint / "config.json"
    raw = json.loads(path.read_text())
    raw["model"]["num_experts"] = 4
    path.write_text(json.dumps(raw))
    table = train_checkpoint.describe_files(checkpoint)
    (checkpoint / "manifest.json").write_text(train_checkpoint.manifest_json(table, 7))
    with pytest.raises(
        ModelCheckpointError, match=r"expert_bias \(checkpoint \[8\], model \[4\]\).*config\.json"
    ):
        load_model_checkpoint(checkpoint)


@pytest.mark.parametrize(
    "text", ['{"model": [1]}', "[]", '{"train": {}}'], ids=["model-a-list", "a-list", "no-model"]
)
def test_a_config_json_without_a_model_section_is_named(tmp_path, config, text):
    from nemotron.models.nano3.checkpoint import config_from_checkpoint

    (tmp_path / "config.json").write_text(text)
    with pytest.raises(
        ModelCheckpointError, match=r"config\.json: expected a JSON object with a 'model' section"
    ):
        config_from_checkpoint(tmp_path)
