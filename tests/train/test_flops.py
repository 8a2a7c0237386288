import pytest

from nemotron.models.nano3.config import Nano3Config
from nemotron.train.flops import attention_forward_flops, mfu, ssd_forward_flops, training_flops_per_token


def test_full_nano3_at_8192_is_about_20_8_gflop_per_token():
    cfg = Nano3Config()
    assert training_flops_per_token(cfg, 8192) / 1e9 == pytest.approx(20.8, abs=0.05)
    assert ssd_forward_flops(cfg) / 1e6 == pytest.approx(3.4, abs=0.05)


def test_attention_grows_with_sequence_length_only():
    cfg = Nano3Config()
    delta = attention_forward_flops(cfg, 8192) - attention_forward_flops(cfg, 4096)
    assert delta == 2 * 32 * 128 * 4096
    per_layer_delta = 6 * 3 * delta
    assert training_flops_per_token(cfg, 8192) - training_flops_per_token(cfg, 4096) == per_layer_delta


def test_mfu_against_h200_peak():
    cfg = Nano3Config()
    tokens_per_s = 989e12 / training_flops_per_token(cfg, 8192)
    assert mfu(tokens_per_s, cfg, 8192) == pytest.approx(1.0)
    assert mfu(tokens_per_s, cfg, 8192, num_gpus=2) == pytest.approx(0.5)


def test_mixed_length_batches_count_each_sample_at_its_own_length():
    from nemotron.models.nano3 import Nano3Config
    from nemotron.train.flops import training_flops, training_flops_per_token

    cfg = Nano3Config()
    long, short = 524288, 4096
    mixed = training_flops(cfg, [long, short, short])
    assert mixed == long * training_flops_per_token(cfg, long) + 2 * short * training_flops_per_token(
        cfg, short
    )
    # the mean length would miss the long sample's quadratic attention work
    mean = (long + 2 * short) / 3
    assert mixed > 3 * mean * training_flops_per_token(cfg, int(mean))
    assert training_flops(cfg, [8192] * 4) == 4 * 8192 * training_flops_per_token(cfg, 8192)


@pytest.mark.parametrize(
    "pattern,experts",
    [
        ("MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME", 128),  # Nano3: 23 M, 23 E, 6 *
        ("MEMEM*EMEMEM*E", 64),  # the benchmarks' proxy: 6 M, 6 E, 2 *, 64 experts
    ],
)
def test_flops_per_token_equal_the_reference_formula_term_by_term(pattern, experts):
    """docs/reference.md §6, written out: each block kind's forward FLOPs at h = 2688, S = 8192,
    times its count in the pattern, plus the LM head, times 3 for training."""
    h, s = 2688, 8192
    attention = 2 * h * (32 * 128 + 2 * 2 * 128) + 2 * 32 * 128 * h + 2 * 32 * 128 * s
    ssd = 2 * 128 * 128 * 8 + 2 * 128 * 4096 + 4 * 4096 * 128  # the "~3.4M at chunk 128"
    mamba = 2 * h * (2 * 4096 + 2 * 8 * 128 + 64) + 2 * 4096 * h + ssd
    moe = 2 * h * experts + 6 * 4 * h * 1856 + 4 * h * 3712
    head = 2 * h * 131072
    forward = pattern.count("*") * attention + pattern.count("M") * mamba + pattern.count("E") * moe + head
    cfg = Nano3Config(hybrid_pattern=pattern, num_layers=len(pattern), num_experts=experts)
    assert training_flops_per_token(cfg, s) == 3 * forward
    assert ssd == pytest.approx(3.4e6, rel=0.01)
    if experts == 128:
        assert 3 * forward / 1e9 == pytest.approx(20.8, abs=0.01)
