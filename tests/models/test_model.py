import pytest
import torch
import torch.nn.functional as F

from nemotron.models.nano3 import MoE, Nano3Config, Nano3ForCausalLM, parameter_counts
from nemotron.models.nano3.attention import Attention
from nemotron.models.nano3.mamba2 import Mamba2Mixer
from nemotron.models.nano3.mlp import MLP

from .tiny import tiny_config


def test_blocks_follow_the_pattern(config):
    model = Nano3ForCausalLM(config)
    kinds = [type(layer.mixer) for layer in model.backbone.layers.values()]
    assert kinds == [Mamba2Mixer, MoE, Attention, MoE, Mamba2Mixer, MLP]
    assert model.moe_layers() == [model.backbone.layers["1"].mixer, model.backbone.layers["3"].mixer]
    assert model.lm_head.weight is not model.backbone.embeddings.weight


def test_forward_loss_and_mask(config):
    model = Nano3ForCausalLM(config).double()
    ids = torch.randint(0, config.vocab_size, (2, 7))
    labels = torch.randint(0, config.vocab_size, (2, 7))
    mask = torch.ones(2, 7)
    mask[0, 4:] = 0
    mask[1, 0] = 0
    model.eval()
    out = model(ids, labels=labels, loss_mask=mask)
    logits = model(ids).logits
    assert logits.shape == (2, 7, config.vocab_size)
    token = F.cross_entropy(logits.reshape(-1, config.vocab_size), labels.reshape(-1), reduction="none")
    expected = (token * mask.reshape(-1)).sum() / mask.sum()
    torch.testing.assert_close(out.lm_loss, expected)
    # eval: no balance term in the loss; it is still reported
    torch.testing.assert_close(out.loss, out.lm_loss)
    assert out.aux_loss is not None and out.aux_loss > 0
    torch.testing.assert_close(model(ids, labels=labels).lm_loss, token.mean())
    assert out.logits is None  # the fused (chunked) loss path holds no logits
    model.fused_loss = False
    unfused = model(ids, labels=labels, loss_mask=mask)
    torch.testing.assert_close(unfused.lm_loss, expected)
    torch.testing.assert_close(unfused.logits, logits)
    # -100 labels are ignored on both paths
    ignored = labels.clone()
    ignored[0, 4:] = -100
    for fused in (True, False):
        model.fused_loss = fused
        torch.testing.assert_close(model(ids, labels=ignored, loss_mask=mask).lm_loss, expected)
        kept = (ignored != -100).reshape(-1)
        torch.testing.assert_close(model(ids, labels=ignored).lm_loss, token[kept].mean())


def test_training_loss_adds_balance_term(config):
    model = Nano3ForCausalLM(config).double().train()
    ids = torch.randint(0, config.vocab_size, (2, 7))
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, out.lm_loss + config.moe_seq_aux_loss_coeff * out.aux_loss)
    # aux_loss sums the per-layer losses: each is >= ~1 for 2 MoE layers
    assert out.aux_loss > 1.5
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_meta_build_then_materialise(config):
    with torch.device("meta"):
        model = Nano3ForCausalLM(config)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(3)
    model.reset_parameters()
    router = model.moe_layers()[0].router
    assert torch.equal(router.expert_bias, torch.zeros_like(router.expert_bias))
    assert torch.equal(router.tokens_per_expert, torch.zeros_like(router.tokens_per_expert))
    mixer = model.backbone.layers["0"].mixer
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    assert torch.equal(model.backbone.norm_f.weight, torch.ones_like(model.backbone.norm_f.weight))
    ids = torch.randint(0, config.vocab_size, (1, 6))
    assert torch.isfinite(model(ids).logits).all()
    # reset_parameters is deterministic under a seed
    first = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(3)
    model.reset_parameters()
    for k, v in model.state_dict().items():
        assert torch.equal(v, first[k]), k


def test_full_nano3_parameter_counts():
    counts = parameter_counts(Nano3Config())
    assert round(counts["total"] / 1e9, 2) == 31.58
    assert round(counts["active"] / 1e9, 2) == 3.23
    assert round(counts["active_with_embeddings"] / 1e9, 2) == 3.58
    kinds = counts["per_block_kind"]
    assert (kinds["mamba"]["layers"], kinds["moe"]["layers"], kinds["attention"]["layers"]) == (23, 23, 6)
    assert round(kinds["mamba"]["params_per_layer"] / 1e6, 2) == 38.74
    assert round(kinds["attention"]["params_per_layer"] / 1e6, 2) == 23.40
    assert round(kinds["moe"]["params_per_layer"] / 1e9, 3) == 1.297
    assert round(kinds["moe"]["active_per_layer"] / 1e6, 1) == 80.2


def test_parameter_counts_match_a_real_model(config):
    model = Nano3ForCausalLM(config)
    counts = parameter_counts(config)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    routed = sum(m.experts.up_proj.numel() + m.experts.down_proj.numel() for m in model.moe_layers())
    inactive = routed * (config.num_experts - config.moe_top_k) // config.num_experts
    assert counts["active_with_embeddings"] == counts["total"] - inactive


def test_tied_embeddings():
    cfg = tiny_config(tie_word_embeddings=True)
    model = Nano3ForCausalLM(cfg)
    assert model.lm_head.weight is model.backbone.embeddings.weight
    assert parameter_counts(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_bad_pattern_rejected():
    from nemotron.models.nano3 import ModelConfigError

    with pytest.raises(ModelConfigError, match="unknown symbol"):
        tiny_config(hybrid_pattern="ME*EMX")


def test_pipeline_parts_chained_give_the_whole_model(config):
    """Parts [0, 2), [2, 5), [5, 6) with the whole model's weights, each fed what the previous
    returned: the same LM loss and balance loss, and the same gradients; parameter names are
    the whole model's."""
    torch.manual_seed(0)
    whole = Nano3ForCausalLM(config)
    parts = [Nano3ForCausalLM(config, blocks=range(a, b)) for a, b in ((0, 2), (2, 5), (5, 6))]
    state = whole.state_dict()
    for part in parts:
        assert set(part.state_dict()) <= set(state)
        part.load_state_dict({k: state[k] for k in part.state_dict()})
    assert parts[0].lm_head is None and parts[1].backbone.embeddings is None
    assert set().union(*(p.state_dict() for p in parts)) == set(state)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=g)
    mask = torch.ones(2, 8)
    mask[1, 5:] = 0
    out = whole(ids[:, :-1], labels=ids[:, 1:], loss_mask=mask)
    hidden, aux = parts[0](ids[:, :-1])
    hidden, aux = parts[1](hidden, aux)
    lm_loss, aux = parts[2](hidden, aux, labels=ids[:, 1:], loss_mask=mask)
    torch.testing.assert_close(lm_loss, out.lm_loss)
    torch.testing.assert_close(aux, out.aux_loss)
    (out.lm_loss + aux.new_tensor(0.3) * out.aux_loss).backward()
    (lm_loss + 0.3 * aux).backward()
    grads = {n: p.grad for part in parts for n, p in part.named_parameters()}
    for name, p in whole.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)
    with pytest.raises(ValueError, match="not a non-empty contiguous range"):
        Nano3ForCausalLM(config, blocks=range(3, 3))


@pytest.mark.parametrize(
    "field,value",
    [
        ("norm_eps", -1.0),
        ("norm_eps", float("nan")),
        ("init_std", -0.1),
        ("mamba_dt_min", -1.0),
        ("mamba_dt_init_floor", -1e-4),
        ("moe_routed_scaling_factor", float("nan")),
        ("moe_routed_scaling_factor", 0.0),
        ("moe_seq_aux_loss_coeff", -1.0),
        ("moe_seq_aux_loss_coeff", float("inf")),
    ],
)
def test_bad_real_valued_setting_is_one_error_naming_it(field, value):
    """These gave NaN logits (norm_eps -1 or NaN, a NaN scaling factor), a foreign error at
    initialisation (torch's 'normal expects std >= 0.0', Python's 'math domain error') or were
    accepted (a negative balance-loss coefficient)."""
    from nemotron.models.nano3 import ModelConfigError

    with pytest.raises(ModelConfigError, match=field):
        tiny_config(**{field: value})


def test_dt_range_must_be_ordered():
    from nemotron.models.nano3 import ModelConfigError

    with pytest.raises(ModelConfigError, match="mamba_dt_min .* must not exceed mamba_dt_max"):
        tiny_config(mamba_dt_min=0.2, mamba_dt_max=0.1)


def test_pipeline_part_without_moe_hands_on_a_fresh_balance_loss(config):
    """A part with no MoE block (blocks 4-5, 'M-' here) passes the balance-loss sum it received
    on. Under FSDP2 that input is a view (its pre-forward hook's), and FSDP2 warns at every
    forward about a module that returns a view: the part returns a fresh tensor, same value,
    and the gradient still reaches the input."""
    assert config.hybrid_pattern[4:6] == "M-"
    part = Nano3ForCausalLM(config, blocks=range(4, 6))
    hidden = torch.randn(2, 8, config.hidden_size)
    received = torch.tensor([0.25], requires_grad=True)
    aux_in = received.view(())  # a view, as FSDP2's pre-forward hook hands it
    lm_loss, aux_out = part(hidden, aux_in, labels=torch.zeros(2, 8, dtype=torch.long))
    assert aux_out._base is None and aux_out is not aux_in
    assert aux_out.item() == 0.25
    (lm_loss + 2.0 * aux_out).backward()
    assert received.grad is not None and received.grad.item() == 2.0
