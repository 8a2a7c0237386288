"""The extension points a parallel layout plugs into: what the model asks of it, in one place.

The model is written for one device and reads top to bottom. Where a parallel layout changes
*what* a module computes (not just where its weights live), the module holds an explicit,
typed object it calls, None on one device; `nemotron.distributed` builds and sets them
(`parallelize`), tests may set them directly. Everything else a layout does is declarative
and outside the model: DTensor `parallelize_module` plans (column / row parallel projections,
vocab-parallel embeddings and LM head), FSDP2 units, and the MoE's dispatcher, chosen like its
router and experts as a component (`MoE(config, dispatcher=...)`).

| attribute                          | set under            | the module calls                 |
|------------------------------------|----------------------|----------------------------------|
| `Attention.context_parallel`       | context parallel     | `attention(q, k, v)`             |
| `Attention.fuse_qkv` (a bool)      | tensor parallel      | (False: one GEMM per projection) |
| `Mamba2Mixer.context_parallel`     | context parallel     | `causal_conv1d(...)`, `ssd(...)` |
| `Mamba2Mixer.tensor_parallel`      | tensor parallel      | `gather_sequence(u)`, rank/size  |
| `MoE.sequence_gather`              | sequence / context p.| `gather_sequence(x)`, `local_sequence(mask)` |
| `Nano3ForCausalLM.vocab_parallel`  | tensor parallel      | `logits(...)`, `loss(...)`       |
| `Nano3ForCausalLM.parallel_init`   | any sharding         | `parallel_init(model)`           |

No method of a module is replaced at run time, and the model never asks whether it was
sharded: it asks these objects. The residual blocks, `Nano3Model.layers` (keyed by block index,
also a pipeline part's and `LocalStages`'), are the repeated unit that layouts wrap one by one:
FSDP2 units, activation checkpoints, and under TP or PP `train.compile`'s compiled regions
(`nn.Module.compile` in place: the block's own forward, its parameter names unchanged; of a MoE
block its norm and shared expert, `train.loop.compiled_parts`).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class ContextParallelOps(Protocol):
    """A rank holds two chunks of every sequence (`nemotron.distributed.context_parallel`)."""

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of the local queries over the whole sequence."""
        ...

    def causal_conv1d(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The depthwise causal convolution (no activation) of the local chunks [b, s, c], each
        fed the positions before it in the sequence."""
        ...

    def ssd(
        self,
        x: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`nemotron.kernels.ssd.ssd` of the local chunks, with the state entering each chunk."""
        ...


class HeadParallelOps(Protocol):
    """A rank computes heads [rank * H / size, (rank + 1) * H / size) of a mixer (tensor
    parallel with sequence parallel: between blocks it holds 1/size of each sequence)."""

    rank: int
    size: int

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """[b, s/size, h] shards -> [b, s, h] on every rank; the backward sums the ranks'
        partial input gradients and returns each its shard."""
        ...


class SequenceGather(Protocol):
    """A rank holds part of every sequence (sequence and/or context parallel)."""

    def gather_sequence(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole sequences from every rank's part, in sequence order."""
        ...

    def local_sequence(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's part of a per-token input the model was fed ([b, s] as the token ids
        are: its context-parallel chunks already), in the layout of its hidden states."""
        ...


class VocabParallelOps(Protocol):
    """The LM head's output is sharded over the vocabulary (tensor parallel)."""

    def logits(self, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """Full logits [b, s, V] from this rank's sequence shard of `hidden`."""
        ...

    def loss(
        self, hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, loss_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Mean token cross-entropy (the model's `lm_loss`), never gathering the logits."""
        ...
