"""The one model-FLOP formula (docs/reference.md §6), shared by training logs and benchmarks.

Counts matrix multiplications only (2 FLOPs per multiply-add), per token, forward pass;
training is 3x forward (backward = 2x forward). Attention's score/value products are counted
causally (half of the full S x S work). Activation recompute is not counted (model FLOPs, not
hardware FLOPs), so MFU is comparable across runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from nemotron.models.nano3.config import Nano3Config

H200_BF16_PEAK_FLOPS = 989e12  # dense BF16 datasheet peak (same compute as H100 SXM)


def attention_forward_flops(cfg: Nano3Config, seq_length: int) -> float:
    h, q = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    projections = 2 * h * (q + 2 * kv) + 2 * q * h
    scores_and_values = 2 * q * seq_length  # 4*q*S for full attention, halved for causal
    return float(projections + scores_and_values)


def ssd_forward_flops(cfg: Nano3Config) -> float:
    """SSD chunked scan per token: C.B^T within a chunk (per group), the intra-chunk weighted
    sum of x, the chunk states and the state-to-output products."""
    q, n, g = cfg.mamba_chunk_size, cfg.mamba_state_size, cfg.mamba_num_groups
    hp = cfg.mamba_num_heads * cfg.mamba_head_dim
    return float(2 * q * n * g + 2 * q * hp + 4 * hp * n)


def mamba_forward_flops(cfg: Nano3Config) -> float:
    h, d_inner = cfg.hidden_size, cfg.mamba_d_inner
    in_proj = 2 * h * (2 * d_inner + 2 * cfg.mamba_num_groups * cfg.mamba_state_size + cfg.mamba_num_heads)
    out_proj = 2 * d_inner * h
    return float(in_proj + out_proj) + ssd_forward_flops(cfg)


def moe_forward_flops(cfg: Nano3Config) -> float:
    h = cfg.hidden_size
    router = 2 * h * cfg.num_experts
    routed = cfg.moe_top_k * 4 * h * cfg.moe_ffn_hidden_size
    shared = 4 * h * cfg.moe_shared_expert_hidden_size
    return float(router + routed + shared)


def mlp_forward_flops(cfg: Nano3Config) -> float:
    return float(4 * cfg.hidden_size * cfg.ffn_hidden_size)


def block_forward_flops(cfg: Nano3Config, kind: str, seq_length: int) -> float:
    """Forward FLOPs per token of one block of `kind` ("attention", "mamba", "moe", "mlp")."""
    if kind == "attention":
        return attention_forward_flops(cfg, seq_length)
    if kind == "mamba":
        return mamba_forward_flops(cfg)
    if kind == "moe":
        return moe_forward_flops(cfg)
    if kind == "mlp":
        return mlp_forward_flops(cfg)
    raise ValueError(f"unknown block kind {kind!r}")


def lm_head_forward_flops(cfg: Nano3Config) -> float:
    return float(2 * cfg.hidden_size * cfg.vocab_size)


def forward_flops_per_token(cfg: Nano3Config, seq_length: int) -> float:
    blocks = sum(block_forward_flops(cfg, kind, seq_length) for kind in cfg.block_kinds)
    return blocks + lm_head_forward_flops(cfg)


def training_flops_per_token(cfg: Nano3Config, seq_length: int) -> float:
    """Model FLOPs per trained token (forward + backward = 3x forward)."""
    return 3.0 * forward_flops_per_token(cfg, seq_length)


def training_flops(cfg: Nano3Config, sample_lengths: Iterable[int]) -> float:
    """Model FLOPs to train on samples of these lengths, every token at its own sample's length
    (a batch mixing 512K- and 4K-token samples costs more than its mean length says)."""
    return sum(
        count * length * training_flops_per_token(cfg, length)
        for length, count in Counter(sample_lengths).items()
    )


def mixed_training_flops_per_token(cfg: Nano3Config, length_shares: Iterable[tuple[int, float]]) -> float:
    """Model FLOPs per trained token of a mix of sample lengths, (length, share of the samples)
    pairs: each sample's tokens at its own length (`training_flops` of a mixed batch over its
    token count)."""
    pairs = list(length_shares)
    tokens = sum(share * n for n, share in pairs)
    return sum(share * n * training_flops_per_token(cfg, n) for n, share in pairs) / tokens


def mfu(
    tokens_per_second: float,
    cfg: Nano3Config,
    seq_length: int,
    num_gpus: int = 1,
    peak_flops_per_gpu: float = H200_BF16_PEAK_FLOPS,
    *,
    length_shares: Iterable[tuple[int, float]] | None = None,
) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of `num_gpus` GPUs. With
    `length_shares` (mixed sample lengths: (length, share of samples)) the tokens are counted
    at their own samples' lengths instead of `seq_length`."""
    per_token = (
        training_flops_per_token(cfg, seq_length)
        if length_shares is None
        else mixed_training_flops_per_token(cfg, length_shares)
    )
    return tokens_per_second * per_token / (peak_flops_per_gpu * num_gpus)
