"""Tensor + sequence parallelism for Nano3 with DTensor, applied from outside the model.

Between blocks the residual stream is a plain local tensor holding this rank's 1/TP of the
sequence (sequence parallel): [batch, seq/TP, hidden]. Every parameter is one of two kinds:

- **DTensor-parallel** (declarative `parallelize_module` plans): attention q/k/v column-parallel
  and o row-parallel, the dense MLP and the MoE's shared expert column/row parallel (inputs
  gathered from the sequence shards, outputs reduce-scattered back), Mamba-2 `out_proj`
  row-parallel, embeddings vocab-parallel (`RowwiseParallel`), the LM head column-parallel over
  the vocabulary. With fewer KV heads than TP ranks (Nano3: 2 KV heads, TP8) k/v are
  replicated and each rank keeps the KV head its query heads read (`KeepKVHead`).
- **rank-local** (plain parameters each TP rank computes with on its own tokens or rows, their
  gradients partial over TP): the norms (on the local sequence shard), the MoE router (each
  rank routes its own shard: the reason TP needs sequence parallel), and the Mamba-2 mixer's
  packed parameters (in_proj packs z|x|B|C|dt, conv1d x|B|C: a rank's slice is not contiguous)
  and its per-head ones. `parallelize.apply_fsdp` shards these over DP x TP, so the
  reduce-scatter sums the TP ranks' partial gradients.

Where a plan cannot say it, the model is given an object through its extension points
(`nemotron.models.nano3.parallel`): the Mamba-2 mixer a `HeadParallel` (gather the sequence,
rank and size for its rows), the MoE a `SequenceGather` (the balance loss on whole sequences,
set by `parallelize`), the model a `VocabParallelLoss` (cross-entropy from vocab-sharded logits,
never gathered).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from nemotron.distributed.mesh import ParallelMesh
from nemotron.kernels.cross_entropy import IGNORE_INDEX
from nemotron.models.nano3.attention import Attention
from nemotron.models.nano3.mamba2 import Mamba2Mixer
from nemotron.models.nano3.mlp import MLP
from nemotron.models.nano3.model import Nano3ForCausalLM
from nemotron.models.nano3.moe import MoE

# -- sequence-shard collectives -----------------------------------------------------------------


def gather_from_shards(x: torch.Tensor, mesh: DeviceMesh, dim: int) -> torch.Tensor:
    """Local shard (of `dim`) -> full tensor on every rank; the gradient each rank sends back is
    partial (it covers only this rank's heads/vocab), so the backward reduce-scatters."""
    full = DTensor.from_local(x, mesh, [Shard(dim)]).redistribute(mesh, [Replicate()])
    return full.to_local(grad_placements=[Partial()])


class HeadParallel:
    """The Mamba-2 mixer's `tensor_parallel` object: this rank computes heads
    [rank*H/TP, (rank+1)*H/TP) (and the matching groups) over the whole sequence."""

    def __init__(self, tp_mesh: DeviceMesh) -> None:
        self.mesh = tp_mesh
        self.rank = tp_mesh.get_local_rank()
        self.size = tp_mesh.size()

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return gather_from_shards(x, self.mesh, 1)


class SequenceGather:
    """The MoE's `sequence_gather` when a rank holds part of each sequence: its sequence-parallel
    shard over `tp_mesh` and/or its context-parallel chunks (`cp`, a `ContextParallel`)."""

    def __init__(self, tp_mesh: DeviceMesh | None = None, cp=None) -> None:
        self.tp_mesh, self.cp = tp_mesh, cp

    def gather_sequence(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        if self.tp_mesh is not None:
            # identical on TP peers, which all compute the same loss: each one's gradient
            # covers its own shard
            x = DTensor.from_local(x, self.tp_mesh, [Shard(dim)]).full_tensor()
        if self.cp is not None:
            # every CP rank computes the whole loss; the gather's backward sums their gradients
            # (FSDP2 then averages over DP x CP)
            x = self.cp.gather_sequence(x, dim)
        return x

    def local_sequence(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        # The model's inputs arrive as this rank's context-parallel chunks (the loader cuts
        # them); between blocks a TP rank holds the contiguous 1/TP of that (`Shard(1)`).
        if self.tp_mesh is None:
            return x
        return x.chunk(self.tp_mesh.size(), dim)[self.tp_mesh.get_local_rank()]


# -- plans ----------------------------------------------------------------------------------------


class KeepKVHead(ParallelStyle):
    """k_proj / v_proj when there are fewer KV heads than TP ranks: the weight is replicated,
    every rank computes all KV heads (a small GEMM) and keeps `head`, the one its query heads
    read. Its gradients (of the weight and of the gathered input) are partial: they cover this
    rank's queries only, and are summed over TP (FSDP2, the input's reduce-scatter)."""

    def __init__(self, head: int, head_dim: int) -> None:
        super().__init__()
        self.head, self.head_dim = head, head_dim

    def _keep_head(self, module: nn.Module, output: DTensor, mesh: DeviceMesh) -> torch.Tensor:
        local = output.to_local(grad_placements=[Partial()])
        return local.narrow(-1, self.head * self.head_dim, self.head_dim)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        # no partition_fn: distribute_module replicates the parameters
        # (torch annotates output_fn as returning None; what it returns replaces the output)
        return distribute_module(module, device_mesh, output_fn=self._keep_head)  # type: ignore[arg-type]


def replicates_kv(num_kv_heads: int, tp: int) -> bool:
    """Whether attention's k/v are replicated (`KeepKVHead`) rather than column-parallel."""
    return num_kv_heads % tp != 0


# FP8 (`train.fp8`, `nemotron.train.fp8`): a linear that `apply_fp8` made a torchao
# `Float8Linear` keeps its plan's parameter sharding; its forward casts its input, weight and
# (in backward) output gradient with one dynamic scale per tensor, taken over the whole DTensor
# (all TP ranks), so every rounding is the single process's. On CUDA the plans use torchao's
# float8 styles, which also move those tensors in float8 (the sequence gather before a
# column-parallel linear, the output-gradient gather of a row-parallel one: half the bytes).
# gloo has no float8 dtypes, so elsewhere the plain styles shard the same modules and the
# gathers move the tensors in their own precision. Which layers may be FP8 under TP is decided
# in `nemotron.train.fp8.tp_fp8_exclusions`.


def _is_float8(linear: nn.Module) -> bool:
    if type(linear) is nn.Linear:  # not converted (also: torchao may not be installed)
        return False
    from torchao.float8.config import ScalingGranularity
    from torchao.float8.float8_linear import Float8Linear

    if not isinstance(linear, Float8Linear):
        return False
    casts = (
        linear.config.cast_config_input,
        linear.config.cast_config_weight,
        linear.config.cast_config_grad_output,
    )
    if any(cast.scaling_granularity is not ScalingGranularity.TENSORWISE for cast in casts):
        raise ValueError(
            "train.fp8.recipe: tensor parallelism needs the tensorwise recipe (torchao's float8 "
            "tensor-parallel styles take one scale per tensor)"
        )
    return True


def _colwise(linear: nn.Module, float8_collectives: bool, **kw) -> ParallelStyle:
    if _is_float8(linear) and float8_collectives:
        from torchao.float8.float8_tensor_parallel import Float8ColwiseParallel

        return Float8ColwiseParallel(**kw)
    return ColwiseParallel(**kw)


def _rowwise(linear: nn.Module, float8_collectives: bool, **kw) -> ParallelStyle:
    if _is_float8(linear) and float8_collectives:
        from torchao.float8.float8_tensor_parallel import Float8RowwiseParallel

        return Float8RowwiseParallel(**kw)
    return RowwiseParallel(**kw)


def _check_fp8_layout(model: Nano3ForCausalLM, tp: int) -> None:
    """FP8 layers whose TP layout would bypass them (converted by `apply_fp8` without
    `tensor_parallel`): an error rather than a silent higher-precision run."""
    if not any(_is_float8(m) for m in model.modules() if isinstance(m, nn.Linear)) and not model.fp8_lm_head:
        return
    from nemotron.train.fp8 import tp_fp8_exclusions

    bypassed = [
        name
        for name in tp_fp8_exclusions(model, tp)
        if (model.fp8_lm_head if name == "lm_head" else _is_float8(model.get_submodule(name)))
    ]
    if bypassed:
        raise ValueError(
            f"FP8 layers {bypassed} have no FP8 form under tensor parallelism: convert with "
            f"apply_fp8(..., tensor_parallel={tp}) before sharding"
        )


def _attention_plan(attn: Attention, tp: int, rank: int, float8: bool) -> dict[str, ParallelStyle]:
    plan: dict[str, ParallelStyle] = {
        "q_proj": _colwise(attn.q_proj, float8),
        "o_proj": _rowwise(attn.o_proj, float8, output_layouts=Shard(1)),
    }
    if not replicates_kv(attn.num_kv_heads, tp):
        plan["k_proj"], plan["v_proj"] = _colwise(attn.k_proj, float8), _colwise(attn.v_proj, float8)
    else:
        # this rank's query heads [rank*Hq/TP, ...) all read KV head rank*KV/TP
        plan["k_proj"] = plan["v_proj"] = KeepKVHead(rank * attn.num_kv_heads // tp, attn.head_dim)
    return plan


def _mlp_plan(mlp: MLP, token_dim: int, float8: bool) -> dict[str, ParallelStyle]:
    return {
        "up_proj": _colwise(mlp.up_proj, float8),
        "down_proj": _rowwise(mlp.down_proj, float8, output_layouts=Shard(token_dim)),
    }


def _gather_tokens(token_dim: int, consumers: Sequence[nn.Module], float8: bool) -> PrepareModuleInput:
    """The mixer's input gathered from the sequence shards; in float8 (one cast for all its
    readers) when `float8` collectives are on and every linear that reads it is FP8."""
    shard, whole = (Shard(token_dim),), (Replicate(),)
    if float8 and all(_is_float8(m) for m in consumers):
        from torchao.float8.float8_tensor_parallel import PrepareFloat8ModuleInput

        return PrepareFloat8ModuleInput(input_layouts=shard, desired_input_layouts=whole)
    return PrepareModuleInput(input_layouts=shard, desired_input_layouts=whole)


def tensor_parallel_submodules(model: Nano3ForCausalLM) -> list[nn.Module]:
    """The submodules of the blocks whose parameters are DTensor-parallel (FSDP2 shards them
    over DP in their own units; the rest of a block is rank-local and sharded over DP x TP)."""
    out: list[nn.Module] = []
    for block in model.backbone.layers.values():
        mixer = block.mixer
        if isinstance(mixer, (Attention, MLP)):
            out.append(mixer)
        elif isinstance(mixer, Mamba2Mixer):
            out.append(mixer.out_proj)
        elif isinstance(mixer, MoE) and mixer.shared_experts is not None:
            out.append(mixer.shared_experts)
    return out


# -- vocab-parallel loss ------------------------------------------------------------------------


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Token cross-entropy from vocab-sharded logits [N, V/TP]: three all-reduces of [N]
    vectors instead of gathering [N, V]. (`torch.distributed.tensor.parallel.loss_parallel`
    does the same but needs the backward inside its context, which the training loop is not.)"""

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, vocab_size, group):
        logits = logits.float()
        vocab_local = logits.shape[-1]
        maximum = logits.max(-1).values
        dist.all_reduce(maximum, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - maximum.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(-1)
        dist.all_reduce(sum_exp, group=group)
        local_label = labels - vocab_start
        here = (local_label >= 0) & (local_label < vocab_local)
        safe = torch.where(here, local_label, torch.zeros_like(local_label))
        target = shifted.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * here
        dist.all_reduce(target, group=group)
        # The rule of the one-device loss (`kernels.cross_entropy._labels_or_nan`): an ignored
        # row (IGNORE_INDEX, weighted 0 by the caller) reads no label; any other label outside
        # the vocabulary makes its row's loss and gradient NaN rather than pass as a loss of lse.
        valid = (labels == IGNORE_INDEX) | ((labels >= 0) & (labels < vocab_size))
        row_scale = torch.where(valid, 1.0, float("nan")).to(logits.dtype)
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), safe, here, row_scale)
        return (sum_exp.log() - target) * row_scale

    @staticmethod
    def backward(ctx, grad):
        softmax, safe, here, row_scale = ctx.saved_tensors
        grad = grad * row_scale
        grad_logits = softmax * grad.unsqueeze(-1)
        grad_logits.scatter_add_(-1, safe.unsqueeze(-1), -(grad * here).unsqueeze(-1))
        return grad_logits, None, None, None, None


def vocab_parallel_cross_entropy(
    logits_local: torch.Tensor, labels: torch.Tensor, vocab_start: int, vocab_size: int, group
) -> torch.Tensor:
    """Per-token loss [N] (identical on every TP rank) from local logits [N, V/TP] of a
    vocabulary of `vocab_size`; NaN at a label outside it other than IGNORE_INDEX."""
    return _VocabParallelCrossEntropy.apply(logits_local, labels, vocab_start, vocab_size, group)


# Tokens (gathered over TP) whose vocab-shard logits one piece of the loss materialises: at
# V/TP = 16K, 512 MiB of fp32 logits, whatever the sequence length (the long-context phase has
# 64K tokens per rank under TP8 CP8).
LOSS_CHUNK_TOKENS = 8192


class VocabParallelLoss:
    """The model's `vocab_parallel` object: the LM head is column-parallel over the vocabulary
    (its plan gathers the sequence shards), the loss is computed from each rank's vocabulary
    shard of the logits and never gathers them."""

    def __init__(self, tp_mesh: DeviceMesh, vocab_size: int) -> None:
        self.mesh = tp_mesh
        self.group = tp_mesh.get_group()
        self.size = tp_mesh.size()
        self.vocab_size = vocab_size
        self.vocab_start = tp_mesh.get_local_rank() * (vocab_size // self.size)

    def logits(self, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        logits_local = lm_head(hidden)  # [b, s, V/TP]
        return DTensor.from_local(logits_local, self.mesh, [Shard(-1)]).full_tensor()

    def _piece_loss(
        self, lm_head: nn.Module, hidden_piece: torch.Tensor, piece_labels: torch.Tensor
    ) -> torch.Tensor:
        logits_local = lm_head(hidden_piece)  # gathers the piece over TP: [b, TP*c, V/TP]
        return vocab_parallel_cross_entropy(
            logits_local.flatten(0, -2),
            piece_labels.reshape(-1),
            self.vocab_start,
            self.vocab_size,
            self.group,
        )

    def loss(
        self, hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, loss_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """hidden: this rank's sequence shard [b, s/TP, h]; labels, loss_mask: [b, s]."""
        weights = (labels != IGNORE_INDEX).to(torch.float32)
        if loss_mask is not None:
            weights = weights * loss_mask.to(torch.float32)
        # The loss in pieces of the local sequence shard, each recomputed in backward
        # (activation checkpointing), so only one piece's logits are ever alive. Piece i
        # gathers local positions [i*c, (i+1)*c) of every TP rank: global positions
        # r*s/TP + i*c + t, rank-major, which is how labels and weights are cut too.
        tp = self.size
        b, local = hidden.shape[0], hidden.shape[1]
        c = max(1, LOSS_CHUNK_TOKENS // (b * tp))
        labels_by_rank, weights_by_rank = labels.reshape(b, tp, local), weights.reshape(b, tp, local)
        loss_sum = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, local, c):
            end = min(start + c, local)
            piece_labels = labels_by_rank[:, :, start:end]
            piece_weights = weights_by_rank[:, :, start:end].reshape(-1)
            if local > c:
                token_loss = torch.utils.checkpoint.checkpoint(
                    self._piece_loss, lm_head, hidden[:, start:end], piece_labels, use_reentrant=False
                )
            else:
                token_loss = self._piece_loss(lm_head, hidden, piece_labels)
            loss_sum = loss_sum + (token_loss * piece_weights).sum()
        return loss_sum / weights.sum().clamp(min=1.0)


def _plain_residual(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook of the vocab-parallel embedding: its reduce-scattered output leaves as a
    plain tensor, as the residual stream is everywhere else. torch hands it over as an
    `AsyncCollectiveTensor` (waited on at first use), and a compiled block (`train.compile`,
    `train.loop.compile_blocks`) fed one dropped the gradient of its input: the embedding's
    gradient was zero under TP2 (torch 2.13, silently). The copy is one [b, s/TP, h] tensor
    per micro-batch; the wait moves from the first block's norm to just before it."""
    return output.clone()


def apply_tensor_parallel(model: Nano3ForCausalLM, mesh: ParallelMesh) -> None:
    """Shard a `Nano3ForCausalLM` over the TP mesh with sequence parallel (see module doc)."""
    tp_mesh = mesh.tp_mesh
    tp, rank = tp_mesh.size(), tp_mesh.get_local_rank()
    float8 = tp_mesh.device_type == "cuda"  # float8 collectives (see FP8 above)
    if model.config.tie_word_embeddings:
        raise NotImplementedError("tensor parallel with tied embeddings is not supported")
    _check_fp8_layout(model, tp)
    # A pipeline part (`Nano3ForCausalLM(config, blocks=...)`) has the embeddings only on the
    # first stage and the LM head only on the last; every part takes and returns the residual
    # stream as this rank's sequence shard [b, s/TP, h], which is what the stages exchange.
    if model.backbone.embeddings is not None:
        parallelize_module(
            model.backbone.embeddings,
            tp_mesh,
            RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        )
        model.backbone.embeddings.register_forward_hook(_plain_residual)
    for block in model.backbone.layers.values():
        mixer = block.mixer
        if isinstance(mixer, Attention):
            mixer.fuse_qkv = False  # q, k and v are sharded by their own plans
            parallelize_module(mixer, tp_mesh, _attention_plan(mixer, tp, rank, float8))
            qkv = [mixer.q_proj, mixer.k_proj, mixer.v_proj]
            parallelize_module(mixer, tp_mesh, _gather_tokens(1, qkv, float8))
        elif isinstance(mixer, Mamba2Mixer):
            mixer.tensor_parallel = HeadParallel(tp_mesh)
            # the heads' partial outputs summed over TP and scattered back over the sequence
            parallelize_module(
                mixer.out_proj, tp_mesh, _rowwise(mixer.out_proj, float8, output_layouts=Shard(1))
            )
        elif isinstance(mixer, MoE):
            shared = mixer.shared_experts
            if shared is not None:  # on the flattened tokens [b*s/TP, h]
                parallelize_module(shared, tp_mesh, _mlp_plan(shared, 0, float8))
                parallelize_module(shared, tp_mesh, _gather_tokens(0, [shared.up_proj], float8))
        elif isinstance(mixer, MLP):
            parallelize_module(mixer, tp_mesh, _mlp_plan(mixer, 1, float8))
            parallelize_module(mixer, tp_mesh, _gather_tokens(1, [mixer.up_proj], float8))
        else:
            raise NotImplementedError(f"no tensor-parallel plan for {type(mixer).__name__}")
    if model.lm_head is not None:
        parallelize_module(model.lm_head, tp_mesh, ColwiseParallel(input_layouts=Shard(1)))
        model.vocab_parallel = VocabParallelLoss(tp_mesh, model.config.vocab_size)
