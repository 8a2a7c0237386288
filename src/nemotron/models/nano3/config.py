"""Typed architecture config for Nemotron 3 Nano and its smaller relatives.

Defaults are the released Nemotron 3 Nano 30B-A3B (see docs/model.md). Small test models
differ only in sizes; the block structure is given by `hybrid_pattern`, one symbol per
residual block: `M` Mamba-2, `E` mixture-of-experts, `*` attention, `-` dense MLP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NANO3_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"

BLOCK_SYMBOLS = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}


class ModelConfigError(ValueError):
    """An architecture config that cannot describe a model."""


def parse_pattern(pattern: str) -> list[str]:
    """The one parser of hybrid layer patterns: returns block kinds, e.g. ['mamba', 'moe', ...]."""
    unknown = sorted({s for s in pattern if s not in BLOCK_SYMBOLS})
    if unknown:
        raise ModelConfigError(
            f"hybrid_pattern has unknown symbol(s) {unknown}; known: "
            + ", ".join(f"{k!r}={v}" for k, v in BLOCK_SYMBOLS.items())
        )
    if not pattern:
        raise ModelConfigError("hybrid_pattern is empty")
    return [BLOCK_SYMBOLS[s] for s in pattern]


@dataclass
class Nano3Config:
    hybrid_pattern: str = NANO3_PATTERN
    num_layers: int = 52
    hidden_size: int = 2688
    vocab_size: int = 131072
    norm_eps: float = 1e-5
    init_std: float = 0.0173
    tie_word_embeddings: bool = False

    # attention (GQA, no positional embedding)
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    head_dim: int = 128

    # Mamba-2
    mamba_num_heads: int = 64
    mamba_head_dim: int = 64
    mamba_state_size: int = 128
    mamba_num_groups: int = 8
    mamba_conv_kernel: int = 4
    mamba_chunk_size: int = 128
    mamba_dt_min: float = 1e-3
    mamba_dt_max: float = 1e-1
    mamba_dt_init_floor: float = 1e-4

    # mixture of experts
    num_experts: int = 128
    moe_top_k: int = 6
    moe_ffn_hidden_size: int = 1856
    moe_shared_expert_hidden_size: int = 3712
    moe_routed_scaling_factor: float = 2.5
    moe_seq_aux_loss_coeff: float = 1e-4

    # dense MLP blocks ('-'), unused by Nano3 itself
    ffn_hidden_size: int = 3712

    def __post_init__(self) -> None:
        self.validate()

    @property
    def block_kinds(self) -> list[str]:
        return parse_pattern(self.hybrid_pattern)

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def output_init_std(self) -> float:
        """Init std of the projections that write into the residual stream (out_proj, o_proj,
        down_proj): Megatron's scaled init for hybrid models, `init_std / sqrt(num_layers)`."""
        return self.init_std / math.sqrt(self.num_layers)

    def validate(self) -> None:
        kinds = self.block_kinds
        if len(kinds) != self.num_layers:
            raise ModelConfigError(f"hybrid_pattern has {len(kinds)} blocks but num_layers={self.num_layers}")
        positive = [
            "hidden_size",
            "vocab_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "mamba_num_heads",
            "mamba_head_dim",
            "mamba_state_size",
            "mamba_num_groups",
            "mamba_conv_kernel",
            "mamba_chunk_size",
            "num_experts",
            "moe_top_k",
            "moe_ffn_hidden_size",
            "ffn_hidden_size",
        ]
        for name in positive:
            value = getattr(self, name)
            # a size is a tensor dimension: past 64 bits torch fails with a bare TypeError
            if type(value) is not int or not 0 < value < 2**63:
                raise ModelConfigError(f"{name} must be a positive 64-bit integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.mamba_num_heads % self.mamba_num_groups:
            raise ModelConfigError(
                f"mamba_num_heads ({self.mamba_num_heads}) must be divisible by "
                f"mamba_num_groups ({self.mamba_num_groups})"
            )
        if "moe" in kinds and not 0 < self.moe_top_k <= self.num_experts:
            raise ModelConfigError(
                f"moe_top_k ({self.moe_top_k}) must be in 1..num_experts ({self.num_experts})"
            )
        shared = self.moe_shared_expert_hidden_size
        if type(shared) is not int or not 0 <= shared < 2**63:
            raise ModelConfigError(
                f"moe_shared_expert_hidden_size must be a 64-bit integer >= 0 (0 = no shared expert), got {shared!r}"
            )
        # Real-valued settings: a bad one would otherwise surface as NaN outputs (norm_eps <= 0,
        # a NaN scaling factor), a foreign error at initialisation (a negative std, log of a
        # negative dt) or a silently wrong init (dt_min above dt_max).
        positive_reals = ["norm_eps", "init_std", "mamba_dt_min", "mamba_dt_max", "moe_routed_scaling_factor"]
        for name in positive_reals:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ModelConfigError(f"{name} must be a positive finite number, got {value!r}")
        if self.mamba_dt_min > self.mamba_dt_max:
            raise ModelConfigError(
                f"mamba_dt_min ({self.mamba_dt_min}) must not exceed mamba_dt_max ({self.mamba_dt_max})"
            )
        for name in ("mamba_dt_init_floor", "moe_seq_aux_loss_coeff"):  # 0: no floor / no loss
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ModelConfigError(f"{name} must be a finite number >= 0, got {value!r}")
