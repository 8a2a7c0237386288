import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nemotron.models.nano3 import MoE, sequence_balance_loss
from nemotron.models.nano3 import moe as moe_module


def per_token_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE written token by token, straight from the definition."""
    r, ex = moe.router, moe.experts
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for s in range(x.shape[1]):
            t = x[b, s]
            # The router is float32 by design, whatever the model dtype.
            scores = torch.sigmoid(r.weight.float() @ t.float())
            chosen = torch.topk(scores + r.expert_bias, r.top_k).indices
            weights = (scores[chosen] / scores[chosen].sum() * r.routed_scaling_factor).to(t.dtype)
            for w, e in zip(weights, chosen):
                out[b, s] += w * (ex.down_proj[e] @ F.relu(ex.up_proj[e] @ t) ** 2)
            sh = moe.shared_experts
            out[b, s] += sh.down_proj.weight @ F.relu(sh.up_proj.weight @ t) ** 2
    return out


@pytest.fixture
def moe(config):
    m = MoE(config).double()
    with torch.no_grad():
        m.router.expert_bias.copy_(torch.randn(config.num_experts) * 0.3)
    return m


def test_moe_equals_per_token_loop(moe, config):
    x = torch.randn(2, 5, config.hidden_size, dtype=torch.float64)
    y, aux = moe(x)
    # float32 routing weights (by design) bound the agreement at float32 precision.
    torch.testing.assert_close(y, per_token_moe(moe, x), rtol=1e-6, atol=1e-9)
    assert aux.ndim == 0


def test_grouped_mm_path_matches_loop(config, monkeypatch):
    if moe_module._grouped_mm_fn() is None:
        pytest.skip("no grouped_mm in this torch")
    experts = moe_module.GroupedExperts(6, 16, 24, 0.1, 0.1)
    counts = torch.tensor([3, 0, 5, 1, 0, 4])
    x = torch.randn(int(counts.sum()), 16)
    with torch.no_grad():
        loop = experts(x, counts)
        monkeypatch.setattr(moe_module, "_can_use_grouped_mm", lambda *a: True)
        grouped = experts(x, counts)
    torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-6)


def test_router_chooses_with_bias_but_weights_without(moe, config):
    r = moe.router
    x = torch.randn(7, config.hidden_size, dtype=torch.float64)
    favoured = torch.tensor([1, 4, 6])
    outs = []
    for push in (5.0, 50.0):
        with torch.no_grad():
            r.expert_bias.zero_()
            r.expert_bias[favoured] = push
        outs.append(r(x))
    for out in outs:
        assert torch.equal(out.topk_idx.sort(-1).values, favoured.expand(7, 3))
    # The weights come from the unbiased scores: identical whatever the bias magnitude ...
    torch.testing.assert_close(outs[0].topk_weight, outs[1].topk_weight)
    # ... and equal to the renormalised sigmoid scores times the scaling factor.
    scores = torch.sigmoid(x.float() @ r.weight.float().T)
    chosen = scores.gather(-1, outs[0].topk_idx)
    expected = chosen / chosen.sum(-1, keepdim=True) * config.moe_routed_scaling_factor
    torch.testing.assert_close(outs[0].topk_weight, expected)
    assert outs[0].topk_weight.dtype == torch.float32


def test_router_without_bias_picks_highest_scores(moe, config):
    r = moe.router
    with torch.no_grad():
        r.expert_bias.zero_()
    x = torch.randn(9, config.hidden_size, dtype=torch.float64)
    out = r(x)
    top = torch.topk(out.scores, config.moe_top_k).indices
    assert torch.equal(out.topk_idx.sort(-1).values, top.sort(-1).values)


def test_counters_count_only_grad_enabled_training_forward(moe, config):
    r = moe.router
    x = torch.randn(2, 5, config.hidden_size, dtype=torch.float64)
    moe.train()
    _, _ = moe(x)
    first = r.tokens_per_expert.clone()
    assert first.sum() == 2 * 5 * config.moe_top_k
    expected = torch.bincount(
        r(x.view(-1, config.hidden_size)).topk_idx.flatten(), minlength=config.num_experts
    )
    torch.testing.assert_close(r.tokens_per_expert - first, expected.float())
    r.tokens_per_expert.zero_()

    with torch.no_grad():
        moe(x)
    assert r.tokens_per_expert.sum() == 0
    moe.eval()
    moe(x)
    assert r.tokens_per_expert.sum() == 0


def test_counters_not_incremented_by_activation_recompute(moe, config):
    moe.train()
    x = torch.randn(2, 5, config.hidden_size, dtype=torch.float64, requires_grad=True)
    y, aux = checkpoint(moe, x, use_reentrant=False)
    assert moe.router.tokens_per_expert.sum() == 2 * 5 * config.moe_top_k
    (y.sum() + aux).backward()  # recomputes the forward inside backward
    assert moe.router.tokens_per_expert.sum() == 2 * 5 * config.moe_top_k
    assert x.grad is not None


def test_buffers_persistence(moe):
    state = moe.state_dict()
    assert "router.expert_bias" in state
    assert "router.tokens_per_expert" not in state
    assert moe.router.expert_bias.dtype == torch.float32


def test_sequence_balance_loss_definition():
    torch.manual_seed(1)
    b, s, e, k = 3, 7, 5, 2
    scores = torch.rand(b, s, e, dtype=torch.float64)
    idx = torch.topk(scores, k).indices
    loss = sequence_balance_loss(scores, idx, k)
    expected = 0.0
    for i in range(b):
        probs = scores[i] / scores[i].sum(-1, keepdim=True)
        for j in range(e):
            f = (idx[i] == j).sum() * e / (k * s)
            expected += f * probs[:, j].mean()
    torch.testing.assert_close(loss, expected / b)
    # Perfectly uniform routing and scores give exactly 1.
    uniform = torch.ones(1, 4, 4, dtype=torch.float64)
    idx = torch.tensor([[[0], [1], [2], [3]]])
    torch.testing.assert_close(sequence_balance_loss(uniform, idx, 1), torch.tensor(1.0, dtype=torch.float64))


def test_balance_loss_has_gradient_to_router(moe, config):
    x = torch.randn(2, 5, config.hidden_size, dtype=torch.float64)
    _, aux = moe(x)
    aux.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.experts.up_proj.grad is None


def test_dispatch_sorts_rows_by_expert_and_combine_undoes_it():
    torch.manual_seed(2)
    tokens, k, e, h = 9, 3, 5, 4
    x = torch.randn(tokens, h, dtype=torch.float64, requires_grad=True)
    topk_idx = torch.stack([torch.randperm(e)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, dtype=torch.float64)
    disp = moe_module.LocalDispatcher(e)
    rows, counts, ctx = disp.dispatch(x, topk_idx, weights)
    assert counts.tolist() == [int((topk_idx == i).sum()) for i in range(e)]
    # rows of expert i form the i-th contiguous block, tokens in ascending order inside it
    start = 0
    for i in range(e):
        want = [t for t in range(tokens) if i in topk_idx[t].tolist()]
        block = rows[start : start + counts[i]]
        torch.testing.assert_close(block, x[want])
        start += int(counts[i])
    # identity experts: combine gives sum_k w_k * x
    y = disp.combine(rows, ctx)
    torch.testing.assert_close(y, weights.sum(-1, keepdim=True) * x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, weights.sum(-1, keepdim=True).expand(tokens, h))


def test_relu2_gradient():
    from nemotron.models.nano3.mlp import relu2

    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(relu2(x), torch.relu(x) ** 2)
    assert torch.autograd.gradcheck(relu2, (x,))


def test_dispatch_and_combine_gradients_float64():
    """The custom row-gather autograd functions of the local dispatcher: exact gradients."""
    from nemotron.models.nano3.moe import LocalDispatcher

    torch.manual_seed(0)
    tokens, k, hidden, experts = 6, 3, 4, 5
    topk_idx = torch.stack([torch.randperm(experts)[:k] for _ in range(tokens)])
    dispatcher = LocalDispatcher(experts)

    def roundtrip(x, w):
        rows, counts, ctx = dispatcher.dispatch(x, topk_idx, w)
        assert int(counts.sum()) == tokens * k
        scale = torch.arange(1.0, tokens * k + 1, dtype=x.dtype).unsqueeze(-1)  # row-dependent
        return dispatcher.combine(rows * scale, ctx)

    x = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True)
    w = torch.rand(tokens, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(roundtrip, (x, w))


def _moe_step(moe, x, gy, fast):
    from nemotron.kernels import fast_paths

    moe.zero_grad()
    xx = x.clone().requires_grad_(True)
    with fast_paths(fast):
        y, aux = moe(xx)
        (y * gy).sum().add(aux).backward()
    return [y, xx.grad] + [p.grad.clone() for p in moe.parameters()]


def test_moe_fused_glue_matches_reference_and_runs_one_gradient_sum(moe, config, monkeypatch):
    """Fast paths: the input's three gradients (router, dispatch, shared expert) are summed by
    one add_n call and the shared expert's output is added inside the combine; same values as
    the reference path (separate adds), gradcheck-exact in float64."""
    from nemotron.kernels.add_n import add_n
    from nemotron.kernels.moe_combine import weighted_combine

    sums, adds = [], []

    def add_n_spy(tensors, dtype):
        sums.append(([t.dtype for t in tensors], dtype))
        return add_n(tensors, dtype)

    def combine_spy(rows, order, position, weight, add=None):
        adds.append(add is not None)
        return weighted_combine(rows, order, position, weight, add)

    monkeypatch.setattr(moe_module, "add_n", add_n_spy)
    monkeypatch.setattr(moe_module, "weighted_combine", combine_spy)

    x = torch.randn(2, 5, config.hidden_size, dtype=torch.float64)
    gy = torch.randn(2, 5, config.hidden_size, dtype=torch.float64)
    fast = _moe_step(moe, x, gy, fast=True)
    assert sums == [([torch.float64] * 3, torch.float64)]  # router, dispatch, shared expert
    assert adds == [True, False]  # forward combine + shared output; dispatch backward (unit weights)
    sums.clear()
    adds.clear()
    ref = _moe_step(moe, x, gy, fast=False)
    assert sums == []
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # the fan-out's gradient sum is exact
    flat = x.reshape(-1, config.hidden_size).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda t: [o.double() if o.dtype == torch.float32 else o for o in moe_module._FanOutInput.apply(t)][
            1:
        ],
        (flat,),
    )


def test_moe_fused_glue_bf16_close_to_reference(config):
    torch.manual_seed(1)
    moe = MoE(config).bfloat16()
    x = torch.randn(2, 7, config.hidden_size).bfloat16()
    gy = torch.randn(2, 7, config.hidden_size).bfloat16()
    fast = _moe_step(moe, x, gy, fast=True)
    ref = _moe_step(moe, x, gy, fast=False)
    assert fast[1].dtype == torch.bfloat16
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_moe_fan_out_without_shared_expert(config):
    moe = MoE(config.__class__(**{**config.__dict__, "moe_shared_expert_hidden_size": 0})).double()
    x = torch.randn(1, 4, config.hidden_size, dtype=torch.float64)
    gy = torch.randn(1, 4, config.hidden_size, dtype=torch.float64)
    for a, b in zip(_moe_step(moe, x, gy, fast=True), _moe_step(moe, x, gy, fast=False)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_shared_expert_overlap_switch_and_cpu_fallback(moe, config):
    """`set_shared_expert_overlap` reaches every MoE layer; the side stream exists only on CUDA
    with fast paths and the local dispatcher, so on CPU the switch changes nothing."""
    from nemotron.kernels import fast_paths
    from nemotron.models.nano3 import Nano3ForCausalLM

    model = Nano3ForCausalLM(config)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    assert layers and not any(m.shared_expert_overlap for m in layers)  # off by default
    assert moe_module.set_shared_expert_overlap(model, True) == len(layers)
    assert all(m.shared_expert_overlap for m in layers)
    x = torch.randn(2, 5, config.hidden_size, dtype=next(moe.parameters()).dtype)
    moe_module.set_shared_expert_overlap(moe, True)
    assert moe._overlap_stream(x.reshape(-1, config.hidden_size)) is None  # CPU: no side stream
    with fast_paths(True):
        on, _ = moe(x)
    moe_module.set_shared_expert_overlap(moe, False)
    off, _ = moe(x)
    assert torch.equal(on, off)


@pytest.mark.parametrize("num_experts", [8, 256, 300, 40000])
def test_narrow_expert_ids_sort_like_int64(num_experts):
    ids = torch.randint(0, num_experts, (4096,), generator=torch.Generator().manual_seed(num_experts))
    keys = moe_module.narrow_expert_ids(ids, num_experts)
    assert keys.element_size() == (1 if num_experts <= 256 else 2 if num_experts <= 32768 else 8)
    assert torch.equal(keys.long(), ids)  # no id changes value
    assert torch.equal(torch.argsort(keys, stable=True), torch.argsort(ids, stable=True))


def test_router_weight_stays_float32_when_the_model_goes_bf16(config):
    """reference.md §1: the router computes in float32; transformers keeps `gate.weight` float32
    in a bf16 NemotronH. `.bfloat16()` used to round the router weight to bf16 (a different
    routing from transformers'); now it keeps the float32 values and the Parameter object."""
    from nemotron.models.nano3 import Nano3ForCausalLM

    model = Nano3ForCausalLM(config)
    router = model.moe_layers()[0].router
    weight, values = router.weight, router.weight.detach().clone()
    model.bfloat16()
    assert router.weight is weight and weight.dtype == torch.float32 and torch.equal(weight, values)
    assert model.backbone.layers["0"].mixer.A_log.dtype == torch.bfloat16  # the rest does go bf16
    x = torch.randn(2, 3, config.hidden_size).bfloat16()
    model.moe_layers()[0](x)[0].float().sum().backward()
    assert weight.grad.dtype == torch.float32
    model.double()  # a float64 oracle keeps float64
    assert weight.dtype == torch.float64


def direct_balance_loss(scores: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """One sequence's balance loss straight from the definition (scores [s, E], idx [s, k])."""
    s, e = scores.shape
    probs = scores / scores.sum(-1, keepdim=True)
    return sum((idx == j).sum() * e / (k * s) * probs[:, j].mean() for j in range(e))


def test_padding_is_left_out_of_the_balance_loss():
    # A mixed-length micro-batch's padding entered both f and P of its sequence (S the padded
    # length): now each sequence is its own tokens only, as it would be alone.
    torch.manual_seed(3)
    b, s, e, k = 3, 7, 5, 2
    lengths = [7, 4, 1]
    scores = torch.rand(b, s, e, dtype=torch.float64)
    idx = torch.topk(scores, k).indices
    padding = torch.arange(s)[None, :] >= torch.tensor(lengths)[:, None]
    loss = sequence_balance_loss(scores, idx, k, padding)
    for row, n in enumerate(lengths):  # per sequence, against the definition on its tokens
        alone = sequence_balance_loss(scores[row : row + 1], idx[row : row + 1], k, padding[row : row + 1])
        torch.testing.assert_close(alone, direct_balance_loss(scores[row, :n], idx[row, :n], k))
    expected = sum(direct_balance_loss(scores[r, :n], idx[r, :n], k) for r, n in enumerate(lengths)) / b
    torch.testing.assert_close(loss, expected)
    # What the padding holds does not matter; no padding at all is the unmasked loss.
    noisy = torch.where(padding[..., None], torch.rand_like(scores), scores)
    noisy_idx = torch.where(padding[..., None], torch.zeros_like(idx), idx)
    torch.testing.assert_close(sequence_balance_loss(noisy, noisy_idx, k, padding), loss)
    none = torch.zeros(b, s, dtype=torch.bool)
    torch.testing.assert_close(
        sequence_balance_loss(scores, idx, k, none), sequence_balance_loss(scores, idx, k)
    )


def test_router_does_not_count_padding():
    idx = torch.tensor([[0, 2], [1, 2], [3, 0], [2, 1]])
    padding = torch.tensor([False, True, False, True])
    assert moe_module.count_per_expert(idx, 4, padding).tolist() == [2, 0, 1, 1]
    assert moe_module.count_per_expert(idx, 4).tolist() == [2, 2, 3, 1]


def test_a_padded_sequence_counts_and_scores_as_it_would_alone(moe, config):
    # Row 1 holds 3 tokens and 4 of padding: the MoE's outputs on real tokens, its expert
    # counts and its balance loss equal those of the two sequences run one at a time.
    x = torch.randn(2, 7, config.hidden_size, dtype=torch.float64)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 3:] = True
    moe.train()
    y, aux = moe(x, padding)
    padded_counts = moe.router.tokens_per_expert.clone()
    moe.router.tokens_per_expert.zero_()
    y0, aux0 = moe(x[:1])
    y1, aux1 = moe(x[1:, :3])
    torch.testing.assert_close(moe.router.tokens_per_expert, padded_counts)
    assert padded_counts.sum() == 10 * config.moe_top_k  # 7 + 3 tokens, k experts each
    torch.testing.assert_close(aux, (aux0 + aux1) / 2)
    torch.testing.assert_close(y[:1], y0)
    torch.testing.assert_close(y[1:, :3], y1)


def test_a_given_router_must_choose_the_configs_top_k(config):
    """`MoE(config, router=...)`: the balance loss counts the config's top k, so a router that
    chooses another k (or over another number of experts) is refused, naming both; it was
    routed with its own k and scored with the config's."""
    from nemotron.models.nano3.moe import Router

    other = Router(config.hidden_size, config.num_experts, config.moe_top_k + 1, 2.5, 0.02)
    with pytest.raises(
        ValueError,
        match=rf"top {config.moe_top_k + 1} of {config.num_experts} .*config top {config.moe_top_k}",
    ):
        MoE(config, router=other)
    same = Router(config.hidden_size, config.num_experts, config.moe_top_k, 2.5, 0.02)
    assert MoE(config, router=same).router is same
