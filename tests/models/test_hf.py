import json
import re
import shutil
from pathlib import Path

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
    # read back in bf16: the router weight stays float32, as transformers holds it in memory
    ours = load_hf(tmp_path / "hf", dtype=torch.bfloat16)
    peer = NemotronHForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.bfloat16)
    for i in (1, 3):
        weight = ours.backbone.layers[str(i)].mixer.router.weight
        assert weight.dtype == peer.model.layers[i].mixer.gate.weight.dtype == torch.float32
        assert torch.equal(weight, peer.model.layers[i].mixer.gate.weight)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    # transformers loads it in the config's dtype (its router in fp32, `_keep_in_fp32_modules`)
    # and writes back the same names, dtypes and values
    hf = NemotronHForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype="auto")
    hf.save_pretrained(str(tmp_path / "resaved"))
    theirs = hf_files(tmp_path / "resaved")
    assert sorted(theirs) == sorted(tensors)
    for name, tensor in theirs.items():
        assert tensor.dtype == tensors[name].dtype and torch.equal(tensor, tensors[name]), name


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


def test_tied_embeddings_export_is_transformers_model_and_round_trips(tmp_path):
    """transformers' NemotronH never ties lm_head to the embedding (its `_tied_weights_keys` is
    empty): a tied export without `lm_head.weight` loaded in it with a random head (logits 150%
    off). The export writes the head; transformers computes our logits (and, head and embedding
    gradients summed, our embedding's gradient); import ties it again, and reads an older export
    without the head as tied."""
    config = tiny_config(tie_word_embeddings=True)
    model = random_model(config).double()
    save_hf(model.state_dict(), config, tmp_path / "hf", dtype=None)
    files = hf_files(tmp_path / "hf")
    assert torch.equal(files["lm_head.weight"], files["backbone.embeddings.weight"])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True

    hf = NemotronHForCausalLM.from_pretrained(
        str(tmp_path / "hf"), dtype=torch.float64, experts_implementation="eager"
    ).eval()
    ids = torch.randint(0, config.vocab_size, (2, 7))
    weights = torch.randn(2, 7, config.vocab_size, dtype=torch.float64)
    ours, theirs = model(ids).logits, hf(ids).logits.double()  # transformers returns float32 logits
    torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-6)
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    embedding = model.backbone.embeddings.weight.grad
    their_embedding = hf.model.embeddings.weight.grad + hf.lm_head.weight.grad
    assert (embedding - their_embedding).norm() / their_embedding.norm() < 1e-5

    loaded_config, state = load_hf_state_dict(tmp_path / "hf")
    assert loaded_config == config
    loaded = load_hf(tmp_path / "hf", dtype=torch.float64)
    assert loaded.lm_head.weight is loaded.backbone.embeddings.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours.detach(), rtol=0, atol=0)

    # an export from before the head was written: the embedding serves as the head
    from safetensors.torch import save_file

    save_file(
        {k: v for k, v in files.items() if k != "lm_head.weight"}, str(tmp_path / "hf" / "model.safetensors")
    )
    old = load_hf(tmp_path / "hf", dtype=torch.float64)
    assert old.config == config and old.lm_head.weight is old.backbone.embeddings.weight
    with torch.no_grad():
        torch.testing.assert_close(old(ids).logits, ours.detach(), rtol=0, atol=0)


def test_tied_config_with_a_different_head_imports_as_transformers_computes(tmp_path):
    """transformers fine-tunes a tied export's head apart from its embedding (and keeps
    tie_word_embeddings true): import gives the untied model transformers computes, not the
    embedding as the head; converting such tensors under the tied config is one error."""
    from nemotron.models.nano3.hf import from_hf_state_dict

    config = tiny_config(tie_word_embeddings=True)
    save_hf(random_model(config).state_dict(), config, tmp_path / "seed", dtype=None)
    hf = NemotronHForCausalLM.from_pretrained(str(tmp_path / "seed"), dtype=torch.float32).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(1.5)
    hf.save_pretrained(str(tmp_path / "tuned"))
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["tie_word_embeddings"] is True

    model = load_hf(tmp_path / "tuned").eval()
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight is not model.backbone.embeddings.weight
    ids = torch.randint(0, config.vocab_size, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(HFInteropError, match="lm_head.weight differs from backbone.embeddings.weight"):
        from_hf_state_dict(hf_files(tmp_path / "tuned"), config, source="tuned")


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


@pytest.mark.parametrize(
    "key,value",
    [
        ("time_step_limit", [0.001, 0.1]),  # transformers >= 5.25 clamps dt to it; ours cannot
        ("time_step_limit", [0.0, 10.0]),
        ("mamba_dt_limit", [0.001, float("inf")]),  # the older spelling of the same key
        ("time_step_limit", [0.0, 1.0, 2.0]),
        ("attention_dropout", 0.1),  # transformers drops attention weights in training; ours never
        ("topk_group", 2),  # of one expert group: transformers' routing cannot run it
        ("mlp_hidden_act", "silu"),
        ("moe_latent_size", 8),
        ("n_group", 2),
    ],
)
def test_config_values_we_cannot_compute_are_refused_by_name(tmp_path, config, key, value):
    """A NemotronH config.json whose value changes what transformers computes, and which Nano3
    cannot represent, is one HFInteropError naming the key (time_step_limit, attention_dropout
    and topk_group were dropped silently)."""
    save_hf(random_model(config).state_dict(), config, tmp_path / "hf", dtype=None)
    path = tmp_path / "hf" / "config.json"
    raw = json.loads(path.read_text())
    if key == "mamba_dt_limit":
        del raw["time_step_limit"]
    path.write_text(json.dumps({**raw, key: value}))
    name = "time_step_limit" if key == "mamba_dt_limit" else key
    with pytest.raises(HFInteropError, match=rf"config\.json: {name}=.*(not supported|not a pair)"):
        from_hf_config(tmp_path / "hf")


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("nemotron_init_time_step_min", "x", r"mamba_dt_min must be a positive finite number, got 'x'"),
        ("nemotron_init_time_step_min", None, r"mamba_dt_min must be a positive finite number, got None"),
        ("hidden_size", 10**30, r"hidden_size must be a positive 64-bit integer"),
        (
            "n_routed_experts",
            10**30,
            r"num_experts must be a positive 64-bit integer.*num_experts <- n_routed_experts",
        ),
        (
            "moe_shared_expert_intermediate_size",
            10**30,
            r"moe_shared_expert_hidden_size must be a 64-bit integer",
        ),
    ],
)
def test_a_value_of_the_wrong_kind_names_the_config_json_key(tmp_path, config, key, value, needle):
    """Before: float('x') raised a bare "ValueError: could not convert string to float", and a
    size past 64 bits torch's TypeError from torch.empty, neither naming the file or key."""
    save_hf(random_model(config).state_dict(), config, tmp_path / "hf", dtype=None)
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(HFInteropError, match=r"config\.json: " + needle):
        from_hf_config(tmp_path / "hf")


def test_invalid_values_name_the_config_json_key(tmp_path, config):
    save_hf(random_model(config).state_dict(), config, tmp_path / "hf", dtype=None)
    path = tmp_path / "hf" / "config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "n_routed_experts": 0}))
    with pytest.raises(
        HFInteropError,
        match=r"num_experts must be a positive 64-bit integer.*num_experts <- n_routed_experts",
    ):
        from_hf_config(tmp_path / "hf")
    path.write_text(json.dumps({**raw, "time_step_max": 1e-5}))  # below our export's init minimum
    with pytest.raises(
        HFInteropError, match=r"mamba_dt_min <- nemotron_init_time_step_min, mamba_dt_max <- time"
    ):
        from_hf_config(tmp_path / "hf")


def test_export_refuses_a_router_transformers_cannot_run(tmp_path):
    """transformers' router takes each expert group's top 2 scores: one expert fails at its
    first forward ("selected index k out of range"); the export says so and writes nothing."""
    config = tiny_config(num_experts=1, moe_top_k=1)
    with pytest.raises(HFInteropError, match="at least 2 experts: num_experts is 1"):
        save_hf(random_model(config).state_dict(), config, tmp_path / "hf", dtype=None)
    assert list(tmp_path.iterdir()) == []


def test_time_step_limits_that_clamp_nothing_are_accepted(tmp_path, config):
    """softplus is never negative: a low end <= 0 with no high end is our no-clamp."""
    save_hf(random_model(config).state_dict(), config, tmp_path / "hf", dtype=None)
    path = tmp_path / "hf" / "config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "time_step_limit": [-1.0, float("inf")]}))  # JSON Infinity
    assert from_hf_config(tmp_path / "hf") == config


def test_full_nano3_config_round_trips_through_hf_config(tmp_path):
    from nemotron.models.nano3 import Nano3Config
    from nemotron.models.nano3.hf import to_hf_config

    hf_config = to_hf_config(Nano3Config())
    assert hf_config.hybrid_override_pattern == Nano3Config().hybrid_pattern
    hf_config.save_pretrained(str(tmp_path))
    assert from_hf_config(tmp_path) == Nano3Config()


def _edit_shard(directory, shard_index, edit):
    """Apply `edit(tensors)` to the shard_index-th safetensors file of a sharded export."""
    from safetensors.torch import load_file, save_file

    shard = sorted(directory.glob("model-*.safetensors"))[shard_index]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return shard


def _set(tensors, key, value):
    tensors[key] = value


HOSTILE_HF = {
    # name: (damage(dir), expected message pattern)
    "missing tensor": (
        lambda d: _edit_shard(d, 0, lambda t: t.pop(sorted(t)[0])),
        r"model-00001-of-\d+\.safetensors: does not hold \S+, which model\.safetensors\.index\.json lists there",
    ),
    "wrong shape": (
        lambda d: _edit_shard(d, 0, lambda t: _set(t, sorted(t)[0], torch.zeros(3, 3))),
        r"has shape \(3, 3\), expected",
    ),
    "integer tensor": (
        lambda d: _edit_shard(d, 0, lambda t: _set(t, sorted(t)[0], t[sorted(t)[0]].to(torch.int32))),
        r"has dtype torch\.int32, expected a floating type",
    ),
    "extra tensor": (
        lambda d: _edit_shard(d, 0, lambda t: _set(t, "backbone.bogus.weight", torch.zeros(2))),
        r"safetensors: holds backbone\.bogus\.weight, but model\.safetensors\.index\.json does not list it",
    ),
    "tensor in two shards": (
        lambda d: _edit_shard(d, 1, lambda t: _set(t, "backbone.embeddings.weight", torch.zeros(96, 32))),
        r"backbone\.embeddings\.weight is in both \S+model-00001\S+ and \S+model-00002",
    ),
    "index names a missing file": (
        lambda d: sorted(d.glob("model-*.safetensors"))[-1].unlink(),
        r"model-\d+-of-\d+\.safetensors: listed in model\.safetensors\.index\.json but missing",
    ),
    "index weight_map not a table": (
        lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": [1]}'),
        r"model\.safetensors\.index\.json: weight_map is not a table",
    ),
    "truncated shard": (
        lambda d: sorted(d.glob("model-*.safetensors"))[0].write_bytes(b"\x10\x00"),
        r"model-00001-of-\d+\.safetensors: cannot read \(SafetensorError",
    ),
    "config not an object": (
        lambda d: (d / "config.json").write_text("[1, 2]"),
        r"config\.json: expected a JSON object, got list",
    ),
    # 10**9 experts: their tensors' names were listed one by one before the comparison found
    # them missing (minutes, then std::bad_alloc); now refused before
    "config asking for more experts than the files hold": (
        lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()), "n_routed_experts": 10**9})
        ),
        r"hf: does not match the architecture in config\.json: n_routed_experts=1000000000, but the "
        r"files hold experts 0\.\.\d+ only",
    ),
    "config field of the wrong type": (
        lambda d: (d / "config.json").write_text(
            json.dumps({**json.loads((d / "config.json").read_text()), "hidden_size": "big"})
        ),
        r"config\.json: \w+Error: .*hidden_size",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_HF))
def test_hostile_hf_directory_is_one_error_naming_the_file(tmp_path, config, case):
    """Every damaged or inconsistent NemotronH directory is one HFInteropError naming the file
    (and tensor), never a foreign exception or a silent half-import (transformers itself would
    take one copy of a duplicated tensor, or cast an integer one)."""
    out = save_hf(
        random_model(config).state_dict(), config, tmp_path / "hf", dtype=None, max_shard_bytes=20_000
    )
    damage, pattern = HOSTILE_HF[case]
    damage(out)
    with pytest.raises(HFInteropError, match=pattern):
        load_hf(out)


def test_unknown_config_fields_are_ignored_as_transformers_does(tmp_path, config):
    model = random_model(config)
    out = save_hf(model.state_dict(), config, tmp_path / "hf", dtype=None)
    path = out / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "some_future_field": [1, 2]}))
    loaded = load_hf(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


# (batch, seq, config overrides): block kinds in unusual orders, Mamba and attention geometries,
# routing settings; tiny_config's chunk is 4, so 7 and 9 cross chunk boundaries unevenly.
GRADIENT_CASES = {
    "base": (2, 9, {}),
    "within one chunk": (1, 3, {}),
    "one step": (2, 1, {}),
    "1 group, top_k = E": (2, 6, dict(num_experts=4, moe_top_k=4, mamba_num_groups=1)),
    "attention first, twice": (2, 7, dict(hybrid_pattern="**EM", num_layers=4)),
    "MoE first and last, no attention": (3, 7, dict(hybrid_pattern="EM-E", num_layers=4)),
    "one Mamba block, 2 steps": (2, 2, dict(hybrid_pattern="M", num_layers=1)),
    "6x4 heads, 3 groups, conv 2, chunk 3": (
        2,
        7,
        dict(
            mamba_num_heads=6, mamba_head_dim=4, mamba_num_groups=3, mamba_conv_kernel=2, mamba_chunk_size=3
        ),
    ),
    "group per head, conv 5, state 16": (
        2,
        9,
        dict(mamba_num_groups=4, mamba_conv_kernel=5, mamba_state_size=16),
    ),
    "MQA, head_dim 12": (2, 9, dict(num_key_value_heads=1, head_dim=12)),
    "MHA, eps 0.1": (2, 9, dict(num_key_value_heads=4, norm_eps=0.1)),
    "top_k 1, scaling 2.5, shared 4": (
        2,
        9,
        dict(moe_top_k=1, moe_routed_scaling_factor=2.5, moe_shared_expert_hidden_size=4),
    ),
}


@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_every_gradient_matches_transformers_per_tensor(tmp_path, case):
    """Each parameter's gradient (A_log, dt_bias, D, conv bias, norm weights, router weight,
    experts, ...) against transformers' NemotronH on the same weights, each tensor by its own
    relative error, and the logits. Both models in float64, but transformers computes its
    norms, SSD scan, router and logits in float32 (largest per-tensor error seen over these
    cases: 6e-6, for A_log of 2-head layers), so the bound is 3e-5. A gradient that is zero
    but for rounding (the router weight's at top_k 1: each token's one weight is normalised to
    1) must be that on both sides."""
    batch, seq, over = GRADIENT_CASES[case]
    config = tiny_config(**over)
    model = random_model(config).double()
    save_hf(model.state_dict(), config, tmp_path / "hf", dtype=None)
    hf = NemotronHForCausalLM.from_pretrained(
        str(tmp_path / "hf"), dtype=torch.float64, experts_implementation="eager"
    ).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    weights = torch.randn(batch, seq, config.vocab_size, dtype=torch.float64)
    ours = model(ids).logits
    # no cache: transformers' own cache fails on a model whose first block is not attention/Mamba
    theirs = hf(ids, use_cache=False).logits.double()
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-6  # float32 logits
    (ours * weights).sum().backward()
    (theirs * weights).sum().backward()
    theirs_by_name = dict(hf.named_parameters())
    scale = max(p.grad.norm().item() for p in theirs_by_name.values())
    errors = {}
    for name, p in model.named_parameters():
        hf_name = name.replace("backbone.", "model.", 1).replace("mixer.router.", "mixer.gate.")
        want = theirs_by_name[hf_name].grad.double()
        largest = max(p.grad.norm().item(), want.norm().item())
        if config.moe_top_k == 1 and name.endswith("router.weight"):
            # zero but for rounding on both sides (1e-7 against a largest gradient of ~500)
            assert largest < 1e-8 * scale, name
            errors[name] = 0.0
            continue
        # a gradient that is zero in exact arithmetic (at one step: A_log, q/k; nothing earlier
        # to attend or decay) must be zero but for rounding on both sides: float64 SDPA leaves
        # ~1e-16 on some CPUs, whose ratio says nothing
        if largest < 1e-12 * scale:
            errors[name] = 0.0
            continue
        diff = (p.grad.double() - want).norm().item()
        errors[name] = diff / want.norm().item() if want.norm() > 0 else diff
    assert len(errors) == len(theirs_by_name)
    bad = {n: f"{e:.1e}" for n, e in errors.items() if not e < 3e-5}
    assert not bad, bad
    assert {n for n in errors if n.endswith(("A_log", "dt_bias", ".D", "conv1d.bias", "router.weight"))}
    # the expert bias chooses only: a buffer on both sides, no gradient
    for layer in model.moe_layers():
        assert "expert_bias" not in dict(layer.router.named_parameters())
    assert not any("e_score_correction_bias" in n for n in theirs_by_name)


@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_transformers_random_model_imports_with_same_logits(tmp_path, case):
    """The other direction, per configuration: a model transformers initialises itself (its own
    A_log, dt_bias and router init), its norms, D, conv biases and expert biases then drawn at
    random, saved by transformers: import gives every tensor bit for bit and the same logits."""
    from nemotron.models.nano3.hf import to_hf_config

    batch, seq, over = GRADIENT_CASES[case]
    config = tiny_config(**over)
    hf = NemotronHForCausalLM(to_hf_config(config)).double().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("A_log", "conv1d.bias")):
                p.normal_()
        for layer in hf.model.layers:
            if layer.block_type == "moe":
                layer.mixer.gate.e_score_correction_bias.normal_(0.0, 0.05)
    hf.save_pretrained(str(tmp_path / "theirs"))
    # the peer is the directory as transformers reads it back (it may save in the config's dtype)
    hf = NemotronHForCausalLM.from_pretrained(
        str(tmp_path / "theirs"), dtype=torch.float64, experts_implementation="eager"
    ).eval()
    model = load_hf(tmp_path / "theirs", dtype=torch.float64).eval()
    assert model.config == config
    theirs = dict(hf.state_dict())
    for name, tensor in model.state_dict().items():
        hf_name = (
            name.replace("backbone.", "model.", 1)
            .replace("mixer.router.weight", "mixer.gate.weight")
            .replace("mixer.router.expert_bias", "mixer.gate.e_score_correction_bias")
        )
        assert torch.equal(tensor, theirs[hf_name].to(tensor.dtype)), name
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with torch.no_grad():
        ours, peer = model(ids).logits, hf(ids, use_cache=False).logits.double()
    assert ((ours - peer).norm() / peer.norm()).item() < 1e-6  # transformers' float32 parts


def _remove_one_file_then_fail(path, ignore_errors=False, **kwargs):
    """`shutil.rmtree` on a file system where removing the directory stops part-way (a file
    the user may not delete; a kill): one file goes, then the error (unless ignored)."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    if files:
        files[0].unlink()
    if not ignore_errors:
        raise PermissionError(13, "Permission denied", str(files[-1] if files else path))


def test_overwrite_whose_removal_of_the_old_export_fails_keeps_the_new_one(tmp_path, config, monkeypatch):
    """The earlier export was removed in place before the new one was renamed there: a removal
    that failed part-way left half of the old export and discarded the new one."""
    out = save_hf(random_model(config).state_dict(), config, tmp_path / "hf", dtype=None)
    model = random_model(config)
    monkeypatch.setattr(shutil, "rmtree", _remove_one_file_then_fail)
    save_hf(model.state_dict(), config, out, dtype=None, overwrite=True)
    monkeypatch.undo()
    _, state = load_hf_state_dict(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    # (the half-removed old copy, hidden, goes at the next write to OUT)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".hf.del-")) == ["hf"]


@pytest.mark.parametrize(
    "config_json, why",
    [
        (None, "holds no config.json"),
        ('{"model_type": "llama"}', "config.json's model_type is 'llama', not 'nemotron_h'"),
        ("not json", "its config.json is not a model config"),
        ('["model_type"]', "its config.json is not a model config"),
    ],
)
def test_overwrite_replaces_only_an_earlier_export(tmp_path, config, config_json, why):
    """`overwrite` replaced any directory whole: prepared data, a run or another model given
    as OUT by mistake was deleted for an export. Only a NemotronH directory is replaced now;
    anything else is refused, untouched, before a byte is written."""
    from nemotron.utils.fs import NotEarlierOutput

    out = tmp_path / "data"
    out.mkdir()
    (out / "shard_0.bin").write_bytes(b"tokens")
    if config_json is not None:
        (out / "config.json").write_text(config_json)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(NotEarlierOutput, match=rf"^{out}: is not an earlier export \({re.escape(why)}\)$"):
        save_hf(random_model(config).state_dict(), config, out, dtype=None, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_an_export_on_a_full_disk_is_one_error_naming_out_and_keeps_the_earlier(
    tmp_path, config, monkeypatch
):
    """safetensors reports a full disk as its own SafetensorError ("I/O error: ..."), which the
    CLI printed without saying where; now one error naming OUT, the earlier export untouched."""
    from safetensors import SafetensorError

    from nemotron.models.nano3 import hf

    out = save_hf(random_model(config).state_dict(), config, tmp_path / "hf", dtype=None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_fills(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(hf, "save_file", disk_fills)
    with pytest.raises(hf.HFWriteError, match=r"hf: the export could not be written: .*No space left"):
        save_hf(random_model(config).state_dict(), config, out, dtype=None, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # nothing half-written beside it
