import json

import pytest
import torch

from nemotron.config.schema import ModelConfig
from nemotron.models.nano3.model import Nano3ForCausalLM
from nemotron.train.checkpoint import (
    LATEST_FILE,
    Checkpointer,
    CheckpointError,
    CheckpointShapeError,
    complete_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
)
from nemotron.train.config import OptimizerConfig
from nemotron.train.optimizer import build_optimizer

from .conftest import TINY_MODEL


def model_and_optimizer(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Nano3ForCausalLM(ModelConfig(**{**TINY_MODEL, **overrides}).arch())
    opt = build_optimizer(model, OptimizerConfig())
    loss = model(torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss
    loss.backward()
    opt.step()
    return model, opt


def test_roundtrip_restores_model_optimizer_biases_rng_and_state(tmp_path):
    model, opt = model_and_optimizer()
    model.moe_layers()[0].router.expert_bias.copy_(torch.arange(8.0) / 100)
    ckpt = Checkpointer(tmp_path / "save")
    torch.manual_seed(42)
    path = ckpt.save(5, model, opt, {"step": 5, "tokens": 80}, {"config.json": "{}"})
    expected_draw = torch.rand(3)
    assert path.name == "iter_0000005" and (tmp_path / "save" / LATEST_FILE).read_text() == "iter_0000005\n"

    other, other_opt = model_and_optimizer(seed=1)
    torch.manual_seed(0)
    loaded = load_checkpoint(tmp_path / "save", other, other_opt)  # a save dir: its latest
    assert loaded.path == path and loaded.train_state == {"step": 5, "tokens": 80}
    assert torch.equal(torch.rand(3), expected_draw)  # RNG state restored
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(other.moe_layers()[0].router.expert_bias, torch.arange(8.0) / 100)
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    for k in sa:
        for key in sa[k]:
            assert torch.equal(sa[k][key], sb[k][key])


def test_wrong_shape_names_the_mismatched_parameters(tmp_path):
    model, opt = model_and_optimizer()
    Checkpointer(tmp_path / "save").save(1, model, opt, {"step": 1})
    wider, wider_opt = model_and_optimizer(num_experts=16)
    with pytest.raises(CheckpointShapeError) as err:
        load_checkpoint(tmp_path / "save", wider, wider_opt)
    message = str(err.value)
    assert "backbone.layers.1.mixer.router.weight" in message or "router" in message
    assert "expert_bias (checkpoint [8], model [16])" in message
    deeper, deeper_opt = model_and_optimizer(hybrid_pattern="ME*EM", num_layers=5)
    with pytest.raises(CheckpointShapeError, match=r"missing from checkpoint: backbone\.layers\.4\."):
        load_checkpoint(tmp_path / "save", deeper, deeper_opt)


def test_incomplete_saves_are_invisible_and_keep_last(tmp_path):
    model, opt = model_and_optimizer()
    ckpt = Checkpointer(tmp_path / "save", keep_last=2)
    for step in (1, 2, 3):
        ckpt.save(step, model, opt, {"step": step})
    assert [s for s, _ in complete_checkpoints(tmp_path / "save")] == [2, 3]
    # A half-written save (killed mid-write) and a stale marker do not fool resume.
    (tmp_path / "save" / ".tmp-iter_0000004").mkdir()
    (tmp_path / "save" / "iter_0000005").mkdir()  # no metadata: not complete
    assert resolve_checkpoint(tmp_path / "save").name == "iter_0000003"
    (tmp_path / "save" / LATEST_FILE).write_text("iter_0000009\n")
    assert resolve_checkpoint(tmp_path / "save").name == "iter_0000003"
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    assert resolve_checkpoint(tmp_path / "empty", must_exist=False) is None


def test_async_save_is_visible_only_after_wait(tmp_path):
    model, opt = model_and_optimizer()
    ckpt = Checkpointer(tmp_path / "save", async_save=True)
    path = ckpt.save(7, model, opt, {"step": 7})
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on while the save is in flight
    if ckpt.in_flight:
        assert not path.exists()
    ckpt.wait()
    assert path.exists() and json.loads((path / "train_state.json").read_text()) == {"step": 7}
    fresh, fresh_opt = model_and_optimizer(seed=3)
    load_checkpoint(path, fresh, fresh_opt)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, reference[name]), name  # the state at save time
