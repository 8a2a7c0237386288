"""The fused Mamba-2 chain's dispatch and argument checks (its numerics are checked against the
mixer's reference path under the Triton interpreter: interpret_checks.py, ``mamba_chain_*``)."""

import pytest
import torch

from nemotron.kernels import fast_paths
from nemotron.kernels.mamba_chain import MambaChainShape, chain_supported, fused_chain, mamba_chain

SHAPE = MambaChainShape(num_heads=4, head_dim=8, num_groups=2, state_size=8, chunk_size=16, eps=1e-5)


def args(**over):
    a = dict(
        zxbcdt=torch.randn(1, 5, SHAPE.in_proj_dim),
        conv_weight=torch.randn(SHAPE.conv_dim, 1, 4),
        conv_bias=torch.randn(SHAPE.conv_dim),
        dt_bias=torch.randn(4),
        A_log=torch.randn(4),
        D=torch.randn(4),
        norm_weight=torch.randn(SHAPE.d_inner),
        shape=SHAPE,
    )
    a.update(over)
    return a


def test_shape_sizes():
    assert SHAPE.d_inner == 32 and SHAPE.conv_dim == 32 + 2 * 16 and SHAPE.in_proj_dim == 32 + 64 + 4


def test_not_supported_on_cpu_or_without_fast_paths_or_odd_chunk():
    x = torch.randn(1, 5, SHAPE.in_proj_dim)
    assert not chain_supported(x, 16)  # CPU tensor: the mixer keeps its step-by-step path
    if torch.cuda.is_available():
        xc = x.cuda()
        assert chain_supported(xc, 16) == __import__("nemotron.kernels").kernels.triton_available()
        with fast_paths(False):
            assert not chain_supported(xc, 16)
        with fused_chain(False):
            assert not chain_supported(xc, 16)
        assert not chain_supported(xc, 24) and not chain_supported(xc, 8)
        assert not chain_supported(xc.double(), 16)


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(zxbcdt=torch.randn(1, 5, SHAPE.in_proj_dim + 1)), "zxbcdt must be"),
        (dict(conv_weight=torch.randn(SHAPE.conv_dim - 1, 1, 4)), "conv weight"),
        (dict(conv_bias=torch.randn(3)), "conv bias"),
        (dict(dt_bias=torch.randn(5)), "dt_bias must be"),
        (dict(A_log=torch.randn(3)), "A_log must be"),
        (dict(D=torch.randn(4, 1)), "D must be"),
        (dict(norm_weight=torch.randn(7)), "norm weight"),
        (dict(shape=MambaChainShape(4, 8, 2, 8, 24, 1e-5)), "chunk_size"),
    ],
)
def test_argument_errors(over, match):
    a = args(**over)
    if "shape" in over:  # a consistent tensor set for the changed shape
        a["zxbcdt"] = torch.randn(1, 5, over["shape"].in_proj_dim)
    with pytest.raises(ValueError, match=match):
        mamba_chain(**a)


def test_reference_chain_is_the_mixer_between_its_projections():
    from nemotron.kernels.mamba_chain import mamba_chain_reference
    from nemotron.models.nano3 import Mamba2Mixer, Nano3Config

    cfg = Nano3Config(
        hybrid_pattern="M",
        num_layers=1,
        hidden_size=16,
        vocab_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        mamba_num_heads=4,
        mamba_head_dim=8,
        mamba_state_size=8,
        mamba_num_groups=2,
        mamba_chunk_size=16,
        num_experts=2,
        moe_top_k=1,
        moe_ffn_hidden_size=8,
        moe_shared_expert_hidden_size=8,
        ffn_hidden_size=8,
    )
    m = Mamba2Mixer(cfg).double()
    with torch.no_grad():
        m.D.uniform_(0.5, 1.5)
        m.norm.weight.uniform_(0.5, 1.5)
    u = torch.randn(2, 21, 16, dtype=torch.float64)
    y = mamba_chain_reference(
        m.in_proj(u), m.conv1d.weight, m.conv1d.bias, m.dt_bias, m.A_log, m.D, m.norm.weight, m.chain_shape
    )
    torch.testing.assert_close(m.out_proj(y), m(u), rtol=1e-12, atol=1e-12)


def test_fused_chain_switch_restores():
    import nemotron.kernels.mamba_chain as chain

    with fused_chain(False):
        assert not chain._FUSED_CHAIN["enabled"]
        with fused_chain(True):
            assert chain._FUSED_CHAIN["enabled"]
        assert not chain._FUSED_CHAIN["enabled"]
    assert chain._FUSED_CHAIN["enabled"]
