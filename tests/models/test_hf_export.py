"""`nemotron nano3 export hf` writes a directory transformers loads on its own: the tokenizer
the training data was tokenized with, generation_config.json, ordinary file modes, and dt
semantics equal to ours (no clamp), checked by loading it with AutoTokenizer and
AutoModelForCausalLM and generating."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nemotron.models.nano3 import Nano3ForCausalLM

from .tiny import tiny_config

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from nemotron.artifacts.model import (  # noqa: E402
    MODEL_ARTIFACT_FILE,
    build_model_artifact,
    data_artifact_record,
    manifest_json,
)
from nemotron.data.config import TokenizerConfig  # noqa: E402
from nemotron.data.tokenizers import load_tokenizer  # noqa: E402

PROMPT = "the experts route hidden states through gates"
WORDS = "the model reads tokens while experts route hidden states through gates mamba scans".split()


@pytest.fixture(scope="module")
def bare_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE saved as a bare tokenizer.json (like the embedded CPU tokenizer)."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(200)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(docs, trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def small_dt_model(config) -> Nano3ForCausalLM:
    """Random weights with dt well below transformers' default clamp (1e-3) in half the heads."""
    model = Nano3ForCausalLM(config, fused_loss=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.uniform_(0.5, 1.5)
            elif name.endswith("dt_bias"):
                p.copy_(torch.tensor([-12.0, -9.0, -1.0, 0.5])[: p.numel()])  # dt ~ 6e-6, 1e-4, ...
            elif name.endswith("A_log"):
                p.uniform_(2.0, 4.0)  # strong decay: a clamp on dt is visible in the output
        for moe in model.moe_layers():
            moe.router.expert_bias.uniform_(-0.05, 0.05)
    return model.eval()


def training_checkpoint(tmp_path: Path, tokenizer_json: Path, model: Nano3ForCausalLM) -> Path:
    """A checkpoint as pretraining writes it, trained on data prepared with `tokenizer_json`:
    its lineage manifest records the data-prep metadata.json (tokenizer record included)."""
    from nemotron.config.schema import ModelConfig, PretrainConfig
    from nemotron.train.checkpoint import Checkpointer

    tokenizer = load_tokenizer(TokenizerConfig(model=str(tokenizer_json), kind="huggingface"))
    data = tmp_path / "data"
    data.mkdir(parents=True)
    (data / "blend.json").write_text(json.dumps({"train": ["1.0", str(data / "shard")]}))
    (data / "metadata.json").write_text(
        json.dumps({"fingerprint": "f" * 64, "tokenizer": tokenizer.describe()})
    )
    manifest = build_model_artifact(
        step=3,
        tokens=96,
        model_config=dataclasses.asdict(model.config),
        data=data_artifact_record(data / "blend.json"),
        phase=1,
    )
    run_config = PretrainConfig(model=ModelConfig(**dataclasses.asdict(model.config)))
    Checkpointer(tmp_path / "save").save(
        3,
        model,
        torch.optim.AdamW(model.parameters()),
        {"step": 3, "tokens": 96},
        files={
            "config.json": json.dumps(dataclasses.asdict(run_config), default=str),
            MODEL_ARTIFACT_FILE: manifest_json(manifest),
        },
    )
    return tmp_path / "save"


def export(*args) -> tuple[int, str]:
    from nemotron.cli.main import app

    result = CliRunner().invoke(app, ["nano3", "export", "hf", *map(str, args)])
    return result.exit_code, result.output


def greedy(model: Nano3ForCausalLM, ids: torch.Tensor, steps: int) -> list[int]:
    """Our greedy continuation (full forward per step: no cache involved)."""
    out = ids
    with torch.no_grad():
        for _ in range(steps):
            next_id = model(out).logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, next_id], dim=1)
    return out[0, ids.shape[1] :].tolist()


def modes(root: Path) -> set[tuple[str, int]]:
    found = {("dir", stat.S_IMODE(root.stat().st_mode))}
    for path in root.rglob("*"):
        found.add(("dir" if path.is_dir() else "file", stat.S_IMODE(path.stat().st_mode)))
    return found


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_export_loads_alone_and_generates_like_ours(tmp_path, bare_tokenizer, umask_022):
    config = tiny_config(vocab_size=320)
    model = small_dt_model(config)
    save = training_checkpoint(tmp_path, bare_tokenizer, model)
    code, output = export(save, tmp_path / "hf", "--dtype", "fp32")
    assert code == 0, output
    assert f"tokenizer {bare_tokenizer}" in " ".join(output.split())
    out = tmp_path / "hf"

    # The tokenizer encodes text exactly as data prep did (which appended EOS).
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ours = load_tokenizer(TokenizerConfig(model=str(bare_tokenizer), kind="huggingface"))
    expected = ours.encode_batch([PROMPT])[0]
    assert expected[-1] == ours.eos_id
    assert tokenizer(PROMPT, add_special_tokens=False).input_ids == expected[:-1]
    assert tokenizer.eos_token == "</s>" and tokenizer.eos_token_id == ours.eos_id

    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(hf).__name__ == "NemotronHForCausalLM"
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    # Generation (transformers' cached decode path) continues exactly as our greedy decode.
    generated = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert generated[0, ids.shape[1] :].tolist() == greedy(model, ids, 6)
    assert hf.generation_config.eos_token_id == ours.eos_id
    assert tokenizer.decode(generated[0, : ids.shape[1]]) == PROMPT

    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ours.eos_id == generation["pad_token_id"]
    assert generation["bos_token_id"] == ours.bos_id
    hf_config = json.loads((out / "config.json").read_text())
    assert (hf_config["eos_token_id"], hf_config["bos_token_id"]) == (ours.eos_id, ours.bos_id)
    assert hf_config["time_step_min"] == torch.finfo(torch.float32).tiny
    assert hf_config["nemotron_init_time_step_min"] == config.mamba_dt_min
    assert {
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "config.json",
        "model.safetensors",
    } <= {p.name for p in out.iterdir()}
    assert modes(out) == {("dir", 0o755), ("file", 0o644)}


def test_time_step_min_is_the_exact_choice(tmp_path, bare_tokenizer):
    """transformers clamps dt from below (at time_step_min up to 5.24, at time_step_limit[0]
    from 5.25); at 1e-3, a model whose dt falls below it gives other logits. The export's values
    (time_step_min the smallest normal float32, time_step_limit [0, inf]) leave dt alone."""
    config = tiny_config(vocab_size=320)
    model = small_dt_model(config)
    code, output = export(
        training_checkpoint(tmp_path, bare_tokenizer, model), tmp_path / "hf", "--dtype", "fp32"
    )
    assert code == 0, output
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        ours = model(ids).logits
        exact = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
        torch.testing.assert_close(exact.eval()(ids).logits, ours, rtol=1e-5, atol=1e-5)
        clamped = AutoModelForCausalLM.from_pretrained(
            str(tmp_path / "hf"), dtype=torch.float32, time_step_min=1e-3
        )
        limits = {tuple(m.time_step_limit) for m in clamped.modules() if hasattr(m, "time_step_limit")}
        if limits == {(0.0, float("inf"))}:  # transformers >= 5.25 clamps at time_step_limit[0]
            clamped = AutoModelForCausalLM.from_pretrained(
                str(tmp_path / "hf"), dtype=torch.float32, time_step_limit=(1e-3, float("inf"))
            )
        assert (clamped.eval()(ids).logits - ours).abs().max() > 1e-4  # 10x the tolerance above


def test_modes_follow_the_umask_and_import_keeps_the_init_range(tmp_path, bare_tokenizer):
    from nemotron.models.nano3.hf import load_hf

    config = tiny_config(vocab_size=320, mamba_dt_min=2e-3)
    save = training_checkpoint(tmp_path, bare_tokenizer, small_dt_model(config))
    previous = os.umask(0o027)
    try:
        code, output = export(save, tmp_path / "hf")
        assert code == 0, output
        assert modes(tmp_path / "hf") == {("dir", 0o750), ("file", 0o640)}
        from nemotron.cli.main import app

        result = CliRunner().invoke(
            app, ["nano3", "import", "hf", str(tmp_path / "hf"), str(tmp_path / "imported")]
        )
        assert result.exit_code == 0, result.output
        assert modes(tmp_path / "imported") <= {("dir", 0o750), ("file", 0o640)}
    finally:
        os.umask(previous)
    assert load_hf(tmp_path / "hf").config == config  # dt init minimum 2e-3 comes back


def test_tokenizer_choices_and_errors(tmp_path, bare_tokenizer):
    config = tiny_config(vocab_size=320)
    model = small_dt_model(config)
    save = training_checkpoint(tmp_path, bare_tokenizer, model)
    # An explicit transformers tokenizer directory wins over the recorded one.
    code, output = export(save, tmp_path / "first")
    assert code == 0, output
    code, output = export(save, tmp_path / "second", "--tokenizer", tmp_path / "first")
    assert code == 0, output
    assert AutoTokenizer.from_pretrained(str(tmp_path / "second")).eos_token == "</s>"
    # Weights only on request; AutoTokenizer then has nothing to load.
    code, output = export(save, tmp_path / "bare", "--no-tokenizer")
    assert code == 0 and not (tmp_path / "bare" / "tokenizer.json").exists()
    code, output = export(save, tmp_path / "x", "--no-tokenizer", "--tokenizer", bare_tokenizer)
    assert code == 2 and "mutually exclusive" in output
    # The recorded tokenizer gone, and no --tokenizer: one line naming the fix, nothing written.
    moved = bare_tokenizer.with_name("moved.json")
    bare_tokenizer.rename(moved)
    try:
        code, output = export(save, tmp_path / "missing")
    finally:
        moved.rename(bare_tokenizer)
    assert code == 1 and "--tokenizer" in output and output.startswith("error:")
    assert not (tmp_path / "missing").exists()
    # A tokenizer larger than the model's vocabulary cannot describe its ids.
    small = tiny_config(vocab_size=128)
    save_small = training_checkpoint(tmp_path / "small", bare_tokenizer, small_dt_model(small))
    code, output = export(save_small, tmp_path / "too-big")
    assert code == 1 and "more than the model's vocab_size 128" in output


def test_a_tokenizer_path_that_is_no_tokenizer_is_named(tmp_path):
    """--tokenizer naming a path that is not there was sent to the hub ("Repo id must be in the
    form 'repo_name' or 'namespace/repo_name'"); an empty directory got transformers' "Couldn't
    instantiate the backend tokenizer ... install sentencepiece or tiktoken"."""
    from nemotron.models.nano3.hf import HFInteropError
    from nemotron.models.nano3.hf_export import load_tokenizer_for_export

    missing = tmp_path / "no" / "tokenizer"
    with pytest.raises(HFInteropError, match=rf"^tokenizer {missing}: no such file or directory"):
        load_tokenizer_for_export(str(missing), None)
    with pytest.raises(HFInteropError, match=r"^tokenizer \./tok: no such file or directory"):
        load_tokenizer_for_export("./tok", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        HFInteropError, match=r"a directory without tokenizer\.json or tokenizer_config\.json"
    ):
        load_tokenizer_for_export(str(tmp_path / "empty"), None)
    from nemotron.models.nano3.hf_export import HUB_ID  # still sent to the hub

    assert all(HUB_ID.fullmatch(s) for s in ("gpt2", "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16"))


@pytest.mark.parametrize(
    "data, needle",
    [
        ("blend.json", r"ModelArtifact-pretrain\.json: data is not an object"),
        ({"content": [1]}, r"ModelArtifact-pretrain\.json: data\.content is not an object"),
        ({"content": {"tokenizer": {"eos_id": "x"}}}, r"data\.content\.tokenizer\.eos_id must be a token id"),
    ],
    ids=["data-a-string", "content-a-list", "eos-id-a-string"],
)
def test_a_damaged_lineage_record_is_named(tmp_path, data, needle):
    """The tokenizer record is looked up in the checkpoint's lineage manifest: a section of the
    wrong kind was a bare "AttributeError: 'str' object has no attribute 'get'" (and an eos_id
    that is no id a bare ValueError from int())."""
    from nemotron.models.nano3.hf import HFInteropError
    from nemotron.models.nano3.hf_export import trained_tokenizer_record

    path = tmp_path / MODEL_ARTIFACT_FILE
    path.write_text(json.dumps({"kind": "ModelArtifact-pretrain", "data": data}))
    with pytest.raises(HFInteropError, match=needle):
        trained_tokenizer_record(tmp_path)
