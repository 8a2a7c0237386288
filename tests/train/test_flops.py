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
