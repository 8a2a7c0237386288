"""Nemotron 3 Nano: config, blocks, model, parameter counts, Hugging Face interchange."""

from nemotron.models.nano3.attention import Attention
from nemotron.models.nano3.config import NANO3_PATTERN, ModelConfigError, Nano3Config, parse_pattern
from nemotron.models.nano3.mamba2 import Mamba2Mixer
from nemotron.models.nano3.mlp import MLP
from nemotron.models.nano3.model import Block, Nano3ForCausalLM, Nano3Model, Nano3Output, cross_entropy
from nemotron.models.nano3.moe import MoE, GroupedExperts, LocalDispatcher, Router, sequence_balance_loss
from nemotron.models.nano3.norm import GatedRMSNorm, RMSNorm
from nemotron.models.nano3.params import parameter_counts

__all__ = [
    "NANO3_PATTERN", "ModelConfigError", "Nano3Config", "parse_pattern",
    "Attention", "Mamba2Mixer", "MLP", "MoE", "GroupedExperts", "LocalDispatcher", "Router",
    "sequence_balance_loss", "GatedRMSNorm", "RMSNorm",
    "Block", "Nano3Model", "Nano3ForCausalLM", "Nano3Output", "cross_entropy", "parameter_counts",
]
