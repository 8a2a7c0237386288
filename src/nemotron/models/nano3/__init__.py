"""Nemotron 3 Nano: config, blocks, model, parameter counts, Hugging Face interchange.

The names below are imported on first use, so that `nemotron.models.nano3.config` (what the
config schema needs) does not import torch."""

from nemotron._lazy import lazy_exports

_EXPORTS = {
    "NANO3_PATTERN": "config",
    "ModelConfigError": "config",
    "Nano3Config": "config",
    "parse_pattern": "config",
    "Attention": "attention",
    "Mamba2Mixer": "mamba2",
    "MLP": "mlp",
    "Block": "model",
    "Nano3Model": "model",
    "Nano3ForCausalLM": "model",
    "Nano3Output": "model",
    "cross_entropy": "model",
    "MoE": "moe",
    "GroupedExperts": "moe",
    "LocalDispatcher": "moe",
    "Router": "moe",
    "sequence_balance_loss": "moe",
    "GatedRMSNorm": "norm",
    "RMSNorm": "norm",
    "parameter_counts": "params",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
