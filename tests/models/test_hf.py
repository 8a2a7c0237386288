import json

import pytest
import torch
from safetensors import safe_open

from nemotron.models.nano3 import Nano3ForCausalLM
from nemotron.models.nano3.hf import HFInteropError, from_hf_config, load_hf, load_hf_state_dict, save_hf

from .tiny import tiny_config

transformers = pytest.importorskip("transformers")
from transformers import NemotronHForCausalLM  # noqa: E402


def random_model(config) -> Nano3ForCausalLM:
    """A model whose every tensor is non-trivial (norm weights, D, biases are not their init)."""
    model = Nano3ForCausalLM(config, fused_loss=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.uniform_(0.5, 1.5)
            elif name.endswith("dt_bias"):
                p.uniform_(-2.0, 0.0)  # small dt is test_hf_export.py's subject
        for moe in model.moe_layers():
            moe.router.expert_bias.copy_(torch.randn_like(moe.router.expert_bias) * 0.05)
    return model.eval()


def hf_files(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as r:
            for k in r.keys():
                out[k] = r.get_tensor(k)
    return out


def test_export_loads_in_transformers_with_same_logits(tmp_path, config):
    model = random_model(config)
    save_hf(model.state_dict(), config, tmp_path / "hf", dtype=None)
    hf = NemotronHForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    # The files are exactly what transformers itself writes for this model.
    hf.save_pretrained(str(tmp_path / "resaved"))
    ours_on_disk, theirs_on_disk = hf_files(tmp_path / "hf"), hf_files(tmp_path / "resaved")
    assert sorted(ours_on_disk) == sorted(theirs_on_disk)
    for k, v in theirs_on_disk.items():
        assert torch.equal(ours_on_disk[k], v), k
    assert "backbone.layers.1.mixer.experts.7.up_proj.weight" in ours_on_disk
    assert ours_on_disk["backbone.layers.1.mixer.experts.7.up_proj.weight"].shape == (16, 32)
    assert ours_on_disk["backbone.layers.1.mixer.experts.7.down_proj.weight"].shape == (32, 16)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_h" and cfg["architectures"] == ["NemotronHForCausalLM"]
    assert cfg["layers_block_type"] == [
        "linear_attention",
        "moe",
        "full_attention",
        "moe",
        "linear_attention",
        "mlp",
    ]


def test_import_from_transformers_same_logits(tmp_path, config):
    exported = random_model(config)
    save_hf(exported.state_dict(), config, tmp_path / "seed", dtype=None)
    hf = NemotronHForCausalLM.from_pretrained(str(tmp_path / "seed"), dtype=torch.float32).eval()
    with torch.no_grad():  # make it differ from what we exported, then let transformers save it
        for p in hf.parameters():
            p.mul_(1.1)
        hf.model.layers[1].mixer.gate.e_score_correction_bias.add_(0.01)
    hf.save_pretrained(str(tmp_path / "theirs"))

    model = load_hf(tmp_path / "theirs").eval()
    assert model.config == config
    ids = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        model.backbone.layers["1"].mixer.router.expert_bias,
        hf.model.layers[1].mixer.gate.e_score_correction_bias,
    )


def test_round_trip_is_lossless_and_sharded(tmp_path, config):
    model = random_model(config)
    out = save_hf(model.state_dict(), config, tmp_path / "hf", dtype=None, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    loaded_config, state = load_hf_state_dict(out)
    assert loaded_config == config
    original = model.state_dict()
    assert sorted(state) == sorted(original)
    for k, v in original.items():
        assert torch.equal(state[k], v), k


def test_bf16_export_keeps_router_in_fp32(tmp_path, config):
    save_hf(random_model(config).state_dict(), config, tmp_path / "hf")
    tensors = hf_files(tmp_path / "hf")
    assert tensors["backbone.layers.1.mixer.gate.weight"].dtype == torch.float32
    assert tensors["backbone.layers.1.mixer.gate.e_score_correction_bias"].dtype == torch.float32
    assert tensors["backbone.layers.0.mixer.in_proj.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"


def test_reads_hybrid_override_pattern(tmp_path, config):
    save_hf(random_model(config).state_dict(), config, tmp_path / "hf", dtype=None)
    path = tmp_path / "hf" / "config.json"
    raw = json.loads(path.read_text())
    del raw["layers_block_type"]
    raw["hybrid_override_pattern"] = config.hybrid_pattern
    # older hub configs also spell some Mamba keys differently
    raw["mamba_n_groups"] = raw.pop("n_groups")
    path.write_text(json.dumps(raw))
    assert from_hf_config(tmp_path / "hf") == config


def test_tied_embeddings_round_trip(tmp_path):
    config = tiny_config(tie_word_embeddings=True)
    model = random_model(config)
    save_hf(model.state_dict(), config, tmp_path / "hf", dtype=None)
    assert "lm_head.weight" not in hf_files(tmp_path / "hf")
    loaded = load_hf(tmp_path / "hf")
    assert loaded.lm_head.weight is loaded.backbone.embeddings.weight
    ids = torch.randint(0, config.vocab_size, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_errors_name_the_problem(tmp_path, config):
    save_hf(random_model(config).state_dict(), config, tmp_path / "hf", dtype=None)
    with pytest.raises(FileExistsError):
        save_hf(random_model(config).state_dict(), config, tmp_path / "hf", dtype=None)
    # a config that does not match the weights
    path = tmp_path / "hf" / "config.json"
    raw = json.loads(path.read_text())
    raw["moe_intermediate_size"] = 20
    path.write_text(json.dumps(raw))
    with pytest.raises(HFInteropError, match="experts.0.up_proj.weight has shape"):
        load_hf_state_dict(tmp_path / "hf")
    raw["model_type"] = "llama"
    path.write_text(json.dumps(raw))
    with pytest.raises(HFInteropError, match="model_type"):
        from_hf_config(tmp_path / "hf")
    with pytest.raises(HFInteropError, match="config.json: not found"):
        from_hf_config(tmp_path)


def test_full_nano3_config_round_trips_through_hf_config(tmp_path):
    from nemotron.models.nano3 import Nano3Config
    from nemotron.models.nano3.hf import to_hf_config

    hf_config = to_hf_config(Nano3Config())
    assert hf_config.hybrid_override_pattern == Nano3Config().hybrid_pattern
    hf_config.save_pretrained(str(tmp_path))
    assert from_hf_config(tmp_path) == Nano3Config()
