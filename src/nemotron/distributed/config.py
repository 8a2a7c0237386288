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
    # Pipeline parallelism (docs/parallelism.md "Pipeline parallel"): the schedule of
    # torch.distributed.pipelining that runs the stages (`distributed.pipeline_split.SCHEDULES`),
    # stages per rank (null: 1 for 1F1B / GPipe, 2 for the interleaved and zero-bubble ones),
    # and optionally the number of blocks of every stage in order (null: balanced by cost).
    pipeline_schedule: str = "1F1B"
    virtual_pipeline_model_parallel_size: int | None = None
    pipeline_blocks_per_stage: list[int] | None = None
