"""Parallel layout, with Megatron's key names (they live under `model.` in the recipe)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelismConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    context_parallel_size: int = 1
    sequence_parallel: bool = False
