import math

import torch
import torch.nn.functional as F

from nemotron.models.nano3 import Mamba2Mixer, Nano3ForCausalLM

from .tiny import tiny_config


def naive_mixer(m: Mamba2Mixer, u: torch.Tensor) -> torch.Tensor:
    """The Mamba-2 mixer written out step by step from its definition (docs/model.md)."""
    b, s, _ = u.shape
    H, P, N, G, K = m.num_heads, m.head_dim, m.state_size, m.num_groups, m.conv1d.kernel_size[0]
    d_inner = H * P
    proj = u @ m.in_proj.weight.T
    # in_proj split order: z, x, B, C, dt.
    z = proj[..., :d_inner]
    xBC = proj[..., d_inner : 2 * d_inner + 2 * G * N]
    dt_raw = proj[..., 2 * d_inner + 2 * G * N :]
    assert dt_raw.shape[-1] == H
    conv = torch.zeros_like(xBC)
    for t in range(s):
        conv[:, t] = m.conv1d.bias
        for j in range(K):  # the filter sees positions t-K+1 .. t only
            src = t - (K - 1) + j
            if src >= 0:
                conv[:, t] += m.conv1d.weight[:, 0, j] * xBC[:, src]
    xBC = F.silu(conv)
    x = xBC[..., :d_inner].reshape(b, s, H, P)
    B = xBC[..., d_inner : d_inner + G * N].reshape(b, s, G, N)
    C = xBC[..., d_inner + G * N :].reshape(b, s, G, N)
    dt = F.softplus(dt_raw + m.dt_bias)
    A = -torch.exp(m.A_log)
    y = torch.zeros(b, s, H, P, dtype=u.dtype)
    for h in range(H):
        g = h // (H // G)
        state = torch.zeros(b, P, N, dtype=u.dtype)
        for t in range(s):
            decay = torch.exp(dt[:, t, h] * A[h])
            state = (
                state * decay[:, None, None]
                + dt[:, t, h, None, None] * x[:, t, h, :, None] * B[:, t, g, None, :]
            )
            y[:, t, h] = torch.einsum("bpn,bn->bp", state, C[:, t, g]) + m.D[h] * x[:, t, h]
    gated = y.reshape(b, s, d_inner) * F.silu(z)
    groups = gated.view(b, s, G, d_inner // G)
    normed = groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + m.norm.eps)
    return (normed.reshape(b, s, d_inner) * m.norm.weight) @ m.out_proj.weight.T


def test_mixer_equals_step_by_step_definition():
    # Sequence 10 with chunk 4: the scan crosses chunk boundaries and ends in a partial chunk.
    m = Mamba2Mixer(tiny_config()).double()
    with torch.no_grad():
        m.D.uniform_(0.5, 1.5)
        m.norm.weight.uniform_(0.5, 1.5)
    u = torch.randn(2, 10, 32, dtype=torch.float64)
    torch.testing.assert_close(m(u), naive_mixer(m, u), rtol=1e-9, atol=1e-11)


def test_mixer_megatron_init():
    cfg = tiny_config(mamba_num_heads=64, mamba_num_groups=8, mamba_head_dim=4)
    m = Mamba2Mixer(cfg)
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= cfg.mamba_dt_min * 0.999 and dt.max() <= cfg.mamba_dt_max * 1.001
    # log-uniform: log dt spread over the whole range, not clustered at one end
    log_dt = torch.log(dt)
    mid = (math.log(cfg.mamba_dt_min) + math.log(cfg.mamba_dt_max)) / 2
    assert (log_dt < mid).sum() > 10 and (log_dt > mid).sum() > 10
    A = torch.exp(m.A_log)
    assert A.min() >= 1.0 and A.max() <= 16.0 and A.std() > 1.0
    assert torch.equal(m.D, torch.ones_like(m.D))
    assert torch.equal(m.norm.weight, torch.ones_like(m.norm.weight))
    assert abs(m.in_proj.weight.std().item() - cfg.init_std) < 0.1 * cfg.init_std
    assert abs(m.out_proj.weight.std().item() - cfg.output_init_std) < 0.1 * cfg.output_init_std
    assert m.conv1d.bias is not None and m.A_log._no_weight_decay


def test_dt_floor():
    cfg = tiny_config(
        mamba_num_heads=64,
        mamba_num_groups=8,
        mamba_head_dim=4,
        mamba_dt_min=1e-6,
        mamba_dt_max=1e-5,
        mamba_dt_init_floor=1e-4,
    )
    dt = F.softplus(Mamba2Mixer(cfg).dt_bias.double())
    torch.testing.assert_close(dt, torch.full_like(dt, 1e-4), rtol=1e-4, atol=0)


def test_whole_model_is_causal(config):
    """Changing token t changes no output before t (conv, SSD, attention, MoE all causal)."""
    model = Nano3ForCausalLM(config).double().eval()
    ids = torch.randint(0, config.vocab_size, (2, 11))
    base = model(ids).logits
    for t in (0, 3, 4, 10):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % config.vocab_size
        out = model(changed).logits
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-12)
        assert (out[:, t:] - base[:, t:]).abs().amax() > 1e-6
