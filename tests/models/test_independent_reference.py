"""Each block against a deliberately naive float64 reference written here from the model's
definition (docs/reference.md §1), not from the project's code: the Mamba-2 mixer as the plain
sequential recurrence, GQA attention as explicit softmax per head, the MoE token by token.

Compared per tensor: the block output, the input gradient and EVERY parameter's gradient, each
by its own relative error (an aggregate error figure can hide one tensor's gradient being
entirely wrong, e.g. A_log's), at the corner shapes: sequence not a multiple of the Mamba chunk,
shorter than one chunk, of length 1, batch > 1, several groups; top_k = num_experts, an expert
receiving no tokens, ties in the router's scores.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nemotron.kernels import fast_paths
from nemotron.models.nano3 import Attention, Mamba2Mixer, MoE

from .tiny import tiny_config

# float64 throughout: the only differences are summation orders (and the router's float32).
BOUND = 1e-9


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative error of one tensor (an all-zero reference must be matched exactly)."""
    diff = (got.double() - want.double()).norm().item()
    scale = want.double().norm().item()
    return diff / scale if scale > 0 else diff


def assert_per_tensor(got: dict, want: dict, bound: float = BOUND) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    errors = {name: rel_err(got[name], want[name]) for name in want}
    bad = {name: f"{err:.2e}" for name, err in errors.items() if not err <= bound}
    assert not bad, f"relative error above {bound:g}: {bad}"


def leaves(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Fresh float64 leaf copies of the module's parameters, for the reference's own autograd."""
    return {n: p.detach().double().clone().requires_grad_(True) for n, p in module.named_parameters()}


def run_block(module, x, gy, fast: bool) -> dict[str, torch.Tensor]:
    """Output, input gradient and every parameter's gradient of `module` for loss sum(out * gy)."""
    module.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_(True)
    with fast_paths(fast):
        out = module(xx)
        loss_out = out[0] if isinstance(out, tuple) else out
        loss = (loss_out * gy).sum()
        if isinstance(out, tuple):
            loss = loss + AUX_WEIGHT * out[1]
        loss.backward()
    grads = {f"grad:{n}": p.grad for n, p in module.named_parameters()}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient reached {missing}"
    return {"out": loss_out.detach(), "grad:input": xx.grad, **grads}


def run_reference(fn, params: dict, x, gy, aux: bool = False) -> dict[str, torch.Tensor]:
    xx = x.clone().requires_grad_(True)
    out = fn(params, xx)
    loss = (out[0] * gy).sum() + AUX_WEIGHT * out[1] if aux else (out * gy).sum()
    loss.backward()
    y = out[0] if aux else out
    return {"out": y.detach(), "grad:input": xx.grad, **{f"grad:{n}": p.grad for n, p in params.items()}}


AUX_WEIGHT = 0.7  # an arbitrary weight, so the balance loss's gradient is checked too


# --- Mamba-2 -------------------------------------------------------------------------------


def naive_mamba2(p: dict, u: torch.Tensor, cfg) -> torch.Tensor:
    H, P, N, G = cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.mamba_state_size, cfg.mamba_num_groups
    K = cfg.mamba_conv_kernel
    d_inner = H * P
    b, s, _ = u.shape
    proj = u @ p["in_proj.weight"].T
    z, xBC, dt_raw = proj.split([d_inner, d_inner + 2 * G * N, H], dim=-1)
    # causal depthwise conv, bias, SiLU: position t sees t-K+1 .. t (zeros before the start)
    w = p["conv1d.weight"][:, 0, :]  # [channels, K]
    steps = []
    for t in range(s):
        acc = p["conv1d.bias"].expand(b, -1)
        for j in range(K):
            src = t - (K - 1) + j
            if src >= 0:
                acc = acc + w[:, j] * xBC[:, src]
        steps.append(acc)
    xBC = F.silu(torch.stack(steps, dim=1))
    x = xBC[..., :d_inner].reshape(b, s, H, P)
    B = xBC[..., d_inner : d_inner + G * N].reshape(b, s, G, N)
    C = xBC[..., d_inner + G * N :].reshape(b, s, G, N)
    dt = F.softplus(dt_raw + p["dt_bias"])  # [b, s, H]
    A = -torch.exp(p["A_log"])
    heads = []
    for h in range(H):
        g = h // (H // G)  # head h reads group h // (heads per group)
        state = u.new_zeros(b, P, N)
        ys = []
        for t in range(s):
            state = torch.exp(dt[:, t, h] * A[h])[:, None, None] * state + (
                dt[:, t, h, None, None] * x[:, t, h, :, None] * B[:, t, g, None, :]
            )
            ys.append((state * C[:, t, g, None, :]).sum(-1) + p["D"][h] * x[:, t, h])
        heads.append(torch.stack(ys, dim=1))  # [b, s, P]
    y = torch.stack(heads, dim=2).reshape(b, s, d_inner)
    gated = (y * F.silu(z)).reshape(b, s, G, d_inner // G)
    normed = gated / torch.sqrt(gated.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
    return (normed.reshape(b, s, d_inner) * p["norm.weight"]) @ p["out_proj.weight"].T


def perturbed_mixer(cfg) -> Mamba2Mixer:
    """A float64 mixer whose every parameter is away from its initial constant (so each gradient
    is non-trivial) with decays of every size (A up to 16, dt up to ~1)."""
    m = Mamba2Mixer(cfg).double()
    with torch.no_grad():
        m.D.uniform_(0.5, 1.5)
        m.norm.weight.uniform_(0.5, 1.5)
        m.conv1d.bias.uniform_(-0.5, 0.5)
        m.dt_bias.uniform_(-3.0, 0.5)
        m.in_proj.weight.mul_(4.0)
    return m


MAMBA_CASES = {
    # name: (batch, seq, config overrides); the tiny chunk is 4
    "ragged_last_chunk_batch2": (2, 10, {}),
    "shorter_than_a_chunk": (2, 3, {}),
    "seq_1": (1, 1, {}),
    "whole_chunks_batch3": (3, 8, {}),
    "one_head_per_group": (2, 6, dict(mamba_num_groups=4)),
    "one_group": (1, 7, dict(mamba_num_groups=1, mamba_chunk_size=2)),
}


@pytest.mark.parametrize("case", list(MAMBA_CASES))
def test_mamba2_mixer_per_tensor_against_sequential_recurrence(case):
    b, s, over = MAMBA_CASES[case]
    cfg = tiny_config(**over)
    m = perturbed_mixer(cfg)
    x = torch.randn(b, s, cfg.hidden_size, dtype=torch.float64)
    gy = torch.randn(b, s, cfg.hidden_size, dtype=torch.float64)
    want = run_reference(lambda p, u: naive_mamba2(p, u, cfg), leaves(m), x, gy)
    # every head's A_log gradient is non-zero (at one step the state before it is zero: A has
    # no effect, and the project's gradient must then be exactly that zero)
    assert (want["grad:A_log"].abs().min() > 0) == (s > 1)
    for fast in (False, True):
        assert_per_tensor(run_block(m, x, gy, fast), want)


# --- attention -------------------------------------------------------------------------------


def naive_attention(p: dict, x: torch.Tensor, cfg) -> torch.Tensor:
    b, s, _ = x.shape
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = (x @ p["q_proj.weight"].T).view(b, s, H, D)
    k = (x @ p["k_proj.weight"].T).view(b, s, KV, D)
    v = (x @ p["v_proj.weight"].T).view(b, s, KV, D)
    heads = []
    for h in range(H):
        kv = h // (H // KV)
        rows = []
        for i in range(s):  # query i attends to keys 0..i, no positional term
            logits = (k[:, : i + 1, kv] * q[:, i, h, None]).sum(-1) / math.sqrt(D)
            rows.append((torch.softmax(logits, dim=-1)[..., None] * v[:, : i + 1, kv]).sum(1))
        heads.append(torch.stack(rows, dim=1))
    return torch.stack(heads, dim=2).reshape(b, s, H * D) @ p["o_proj.weight"].T


@pytest.mark.parametrize("b,s,kv_heads", [(2, 7, 2), (1, 1, 2), (3, 5, 1), (1, 4, 4)])
def test_attention_per_tensor_against_explicit_softmax(b, s, kv_heads):
    cfg = tiny_config(num_key_value_heads=kv_heads)
    attn = Attention(cfg).double()
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj):
            proj.weight.mul_(8.0)  # peaked softmax rows
    x = torch.randn(b, s, cfg.hidden_size, dtype=torch.float64)
    gy = torch.randn(b, s, cfg.hidden_size, dtype=torch.float64)
    want = run_reference(lambda p, u: naive_attention(p, u, cfg), leaves(attn), x, gy)
    for fast in (False, True):  # three Linears / one fused q|k|v GEMM
        assert_per_tensor(run_block(attn, x, gy, fast), want)


# --- MoE -------------------------------------------------------------------------------------


def naive_topk(biased: torch.Tensor, k: int) -> list[int]:
    """The k largest, largest first; among equal values the lower expert index first."""
    values = biased.tolist()
    order = sorted(range(len(values)), key=lambda e: (-values[e], e))
    return order[:k]


def naive_moe(p: dict, x: torch.Tensor, cfg, expert_bias: torch.Tensor, chosen_log: list):
    """The MoE token by token, and the DeepSeek-V3 sequence balance loss (f_i from the unbiased
    top k)."""
    b, s, _ = x.shape
    E, k = cfg.num_experts, cfg.moe_top_k
    out = []
    seq_losses = []
    for bi in range(b):
        probs, counts = [], torch.zeros(E, dtype=torch.float64)
        for t in range(s):
            tok = x[bi, t]
            # router in float32 (the model's definition), then everything in float64
            scores = torch.sigmoid((p["router.weight"].float() @ tok.float()).double())
            chosen = naive_topk((scores.float() + expert_bias).double(), k)
            chosen_log.append(chosen)
            sel = scores[chosen]
            weights = sel / sel.sum() * cfg.moe_routed_scaling_factor
            y = tok.new_zeros(tok.shape)
            for w, e in zip(weights, chosen):
                hidden = torch.relu(p["experts.up_proj"][e] @ tok) ** 2
                y = y + w * (p["experts.down_proj"][e] @ hidden)
            shared = torch.relu(p["shared_experts.up_proj.weight"] @ tok) ** 2
            out.append(y + p["shared_experts.down_proj.weight"] @ shared)
            probs.append(scores / scores.sum())
            # f_i counts each token's top k of the UNBIASED scores (DeepSeek-V3 eq. 18,
            # Megatron-Core's routing map for aux losses), not the experts the bias chose
            counts[naive_topk(scores.float().double(), k)] += 1
        f = counts * E / (k * s)
        seq_losses.append((f * torch.stack(probs).mean(0)).sum())
    return torch.stack(out).view_as(x), torch.stack(seq_losses).mean()


def moe_case(seed: int, **over):
    cfg = tiny_config(**over)
    torch.manual_seed(seed)
    m = MoE(cfg).double()
    with torch.no_grad():
        m.router.expert_bias.copy_(torch.randn(cfg.num_experts) * 0.05)
        m.router.weight.mul_(10.0)  # scores spread over (0, 1)
    return cfg, m


def check_moe(cfg, m, x, gy) -> list:
    chosen: list = []
    bias = m.router.expert_bias.clone()
    want = run_reference(lambda p, u: naive_moe(p, u, cfg, bias, chosen), leaves(m), x, gy, aux=True)
    # the router's gradient comes from float32 scores: float32's precision bounds it
    for fast in (False, True):
        assert_per_tensor(run_block(m, x, gy, fast), want, bound=1e-6)
    assert torch.equal(m.router.expert_bias, bias)  # a buffer: no gradient, unchanged by forward
    return chosen


def test_moe_per_tensor_against_token_loop():
    cfg, m = moe_case(0)
    x = torch.randn(2, 5, cfg.hidden_size, dtype=torch.float64)
    check_moe(cfg, m, x, torch.randn_like(x))


def test_moe_top_k_equals_num_experts():
    cfg, m = moe_case(1, num_experts=4, moe_top_k=4)
    x = torch.randn(3, 2, cfg.hidden_size, dtype=torch.float64)
    chosen = check_moe(cfg, m, x, torch.randn_like(x))
    assert all(sorted(c) == [0, 1, 2, 3] for c in chosen)


def test_moe_expert_receiving_no_tokens_gets_zero_gradient():
    cfg, m = moe_case(2)
    with torch.no_grad():
        m.router.expert_bias[5] = -10.0  # never chosen
    x = torch.randn(1, 6, cfg.hidden_size, dtype=torch.float64)
    chosen = check_moe(cfg, m, x, torch.randn_like(x))
    assert not any(5 in c for c in chosen)
    grads = run_block(m, x, torch.randn_like(x), fast=False)
    assert grads["grad:experts.up_proj"][5].abs().max() == 0  # zero, not missing
    assert grads["grad:experts.down_proj"][5].abs().max() == 0


def test_moe_ties_in_router_scores_choose_the_lower_expert_index():
    """Equal biased scores: the lower expert index wins and comes first, on every path (the
    Triton routing kernel's rule; torch.topk leaves the order among equal values unspecified)."""
    cfg, m = moe_case(3, num_experts=8, moe_top_k=3)
    with torch.no_grad():
        m.router.expert_bias.zero_()
        w = m.router.weight
        w.copy_(-w.abs() / 20.0)  # positive tokens: every score below 0.5 (none saturated) ...
        w[6] = w[7] = w[2] = -w[2]  # ... but experts 2, 6, 7: the same score, above 0.5 ...
        w[0] = -2.0 * w[0]  # ... and expert 0's above theirs
    x = torch.randn(2, 4, cfg.hidden_size, dtype=torch.float64).abs()
    chosen = check_moe(cfg, m, x, torch.randn_like(x))
    assert chosen == [[0, 2, 6]] * 8  # the tie crosses the cut: 7 is left out
    with torch.no_grad():
        w.zero_()  # all eight experts tie
    assert m.router(x.view(-1, cfg.hidden_size)).topk_idx.tolist() == [[0, 1, 2]] * 8


# --- the whole model: fused loss and fast paths against the reference path ------------------


def test_whole_model_fused_loss_and_fast_paths_match_reference_per_tensor():
    """`train.fused_kernels` (the chunked LM-head loss) and the CPU fast paths (one q|k|v GEMM,
    the MoE fan-out's one gradient sum, the shared output added in the combine) against the
    unfused loss on the reference path: the loss and every parameter's gradient, per tensor,
    in float64 (training mode: the balance loss is in the loss), with a ragged mask."""
    from nemotron.models.nano3 import Nano3ForCausalLM

    cfg = tiny_config()
    model = Nano3ForCausalLM(cfg).double().train()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    labels = torch.randint(0, cfg.vocab_size, (2, 9))
    labels[0, 6:] = -100
    mask = (torch.rand(2, 9) > 0.3).double()

    def grads(fused: bool, fast: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.fused_loss = fused
        with fast_paths(fast):
            out = model(ids, labels=labels, loss_mask=mask)
            out.loss.backward()
        return {"loss": out.loss.detach(), **{n: p.grad for n, p in model.named_parameters()}}

    want = grads(fused=False, fast=False)
    assert all(g is not None for g in want.values())
    assert_per_tensor(grads(fused=True, fast=True), want, bound=1e-10)
    assert_per_tensor(grads(fused=True, fast=False), want, bound=1e-10)


def test_dtypes_under_bf16_autocast(monkeypatch):
    """reference.md §1 under bf16 autocast over float32 weights: the router's logits, scores and
    weights float32, A = -exp(A_log) and dt float32 into the scan, the state float32; the
    projections, the scan's x/B/C and the experts bf16."""
    import nemotron.models.nano3.mamba2 as mamba_module
    import nemotron.models.nano3.moe as moe_module
    from nemotron.models.nano3 import Nano3ForCausalLM

    seen: dict[str, torch.dtype] = {}
    ssd, route_topk, experts_forward = (
        mamba_module.ssd,
        moe_module.route_topk,
        moe_module.GroupedExperts.forward,
    )

    def spy_ssd(x, dt, A, B, C, chunk_size):
        seen.update(ssd_x=x.dtype, ssd_dt=dt.dtype, ssd_A=A.dtype, ssd_B=B.dtype)
        y, state = ssd(x, dt, A, B, C, chunk_size)
        seen.update(ssd_state=state.dtype)
        return y, state

    def spy_route(logits, bias, k, scale):
        out = route_topk(logits, bias, k, scale)
        seen.update(router_logits=logits.dtype, router_scores=out[0].dtype, router_weights=out[2].dtype)
        return out

    def spy_experts(self, x, counts):
        out = experts_forward(self, x, counts)
        seen.update(experts_out=out.dtype)
        return out

    monkeypatch.setattr(mamba_module, "ssd", spy_ssd)
    monkeypatch.setattr(moe_module, "route_topk", spy_route)
    monkeypatch.setattr(moe_module.GroupedExperts, "forward", spy_experts)
    model = Nano3ForCausalLM(tiny_config(), fused_loss=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, 96, (2, 6))).logits
    assert seen == dict(
        ssd_x=torch.bfloat16,
        ssd_dt=torch.float32,
        ssd_A=torch.float32,
        ssd_B=torch.bfloat16,
        ssd_state=torch.float32,
        router_logits=torch.float32,
        router_scores=torch.float32,
        router_weights=torch.float32,
        experts_out=torch.bfloat16,
    )
    assert logits.dtype == torch.bfloat16
