"""Tensor + sequence parallelism for Nano3 with DTensor, applied from outside the model.

Between blocks the residual stream is a plain local tensor holding this rank's 1/TP of the
sequence (sequence parallel): [batch, seq/TP, hidden]. Per block:

- norms: per token, so they run on the local shard; weight `Replicate`, gradient `Partial`
  (summed over TP by FSDP2 when reduced).
- attention (heads): q/k/v column-parallel, o row-parallel (`parallelize_module` with
  `ColwiseParallel`/`RowwiseParallel`); input gathered from the sequence shards, output
  reduce-scattered back. With fewer KV heads than TP ranks (Nano3: 2 KV heads, TP8) each rank
  computes the one KV head its query heads use (replicated weight, partial gradient).
- Mamba-2 (heads and groups): rank r keeps heads [r*H/TP, ...) and groups [r*G/TP, ...).
  `out_proj` (columns), `norm`, `dt_bias`, `A_log`, `D` are sharded DTensors. `in_proj` packs
  z|x|B|C|dt and conv1d packs x|B|C, so a rank's slice is not contiguous: those stay plain
  parameters that FSDP2 shards over DP x TP; after the all-gather each rank computes with its
  rows and the reduce-scatter over DP x TP sums the TP ranks' partial gradients.
- MoE: each rank routes its own sequence shard (the reason TP needs sequence parallel); the
  router weight is replicated (gradient `Partial`), routed experts use expert parallel, the
  shared expert is column/row parallel over the gathered tokens; the sequence balance loss is
  computed on the gathered scores so it equals the single-device value.
- embeddings: vocab-parallel (`RowwiseParallel`); LM head: column-parallel over the vocab,
  with a vocab-parallel cross-entropy that never gathers the logits.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from nemotron.distributed.local_view import local_param, local_view
from nemotron.distributed.mesh import ParallelMesh
from nemotron.kernels.cross_entropy import IGNORE_INDEX


# -- helpers ------------------------------------------------------------------------------------

def _distribute(module: nn.Module, name: str, mesh, placement) -> None:
    param = module._parameters[name]
    module.register_parameter(
        name, nn.Parameter(distribute_tensor(param.detach(), mesh, [placement]),
                           requires_grad=param.requires_grad))


def gather_from_shards(x: torch.Tensor, mesh, dim: int) -> torch.Tensor:
    """Local shard (of `dim`) -> full tensor on every rank; the gradient each rank sends back is
    partial (it covers only this rank's heads/vocab), so the backward reduce-scatters."""
    full = DTensor.from_local(x, mesh, [Shard(dim)]).redistribute(mesh, [Replicate()])
    return full.to_local(grad_placements=[Partial()])


def reduce_to_shards(x: torch.Tensor, mesh, dim: int) -> torch.Tensor:
    """Partial sums on every rank -> this rank's shard of `dim` of their sum."""
    return DTensor.from_local(x, mesh, [Partial()]).redistribute(mesh, [Shard(dim)]).to_local()


# -- per-module plans ---------------------------------------------------------------------------

def _norm_on_local_tokens(norm: nn.Module, tp_mesh) -> None:
    _distribute(norm, "weight", tp_mesh, Replicate())
    inner = norm.forward

    def forward(x):
        with local_view([(norm, "weight", local_param(norm.weight))], []):
            return inner(x)

    norm.forward = forward


def _attention(attn: nn.Module, tp_mesh) -> None:
    tp, rank = tp_mesh.size(), tp_mesh.get_local_rank()
    plan = {
        "q_proj": ColwiseParallel(),
        "o_proj": RowwiseParallel(output_layouts=Shard(1)),
    }
    kv_sharded = attn.num_kv_heads % tp == 0
    if kv_sharded:
        plan["k_proj"] = ColwiseParallel()
        plan["v_proj"] = ColwiseParallel()
    parallelize_module(attn, tp_mesh, plan)
    parallelize_module(attn, tp_mesh, PrepareModuleInput(
        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)))
    if not kv_sharded:
        # this rank's query heads [rank*Hq/TP, ...) all read KV head rank*KV/TP
        head = rank * attn.num_kv_heads // tp
        rows = torch.arange(head * attn.head_dim, (head + 1) * attn.head_dim)
        for proj in (attn.k_proj, attn.v_proj):
            _distribute(proj, "weight", tp_mesh, Replicate())
            proj.forward = types.MethodType(
                lambda self, x, rows=rows: F.linear(
                    x.to_local(grad_placements=[Partial()]),
                    local_param(self.weight, rows.to(x.device))), proj)


def _mlp(mlp: nn.Module, tp_mesh, token_dim: int) -> None:
    parallelize_module(mlp, tp_mesh, {
        "up_proj": ColwiseParallel(),
        "down_proj": RowwiseParallel(output_layouts=Shard(token_dim)),
    })
    parallelize_module(mlp, tp_mesh, PrepareModuleInput(
        input_layouts=(Shard(token_dim),), desired_input_layouts=(Replicate(),)))


def _segment_rows(sizes: list[int], rank: int, tp: int) -> torch.Tensor:
    """Indices of rank's 1/TP slice of every segment of a packed dimension."""
    rows, start = [], 0
    for size in sizes:
        part = size // tp
        rows.append(torch.arange(start + rank * part, start + (rank + 1) * part))
        start += size
    return torch.cat(rows)


def _mamba(mixer: nn.Module, tp_mesh) -> None:
    tp, rank = tp_mesh.size(), tp_mesh.get_local_rank()
    gn = mixer.num_groups * mixer.state_size
    in_rows = _segment_rows([mixer.d_inner, mixer.d_inner, gn, gn, mixer.num_heads], rank, tp)
    conv_rows = _segment_rows([mixer.d_inner, gn, gn], rank, tp)
    _distribute(mixer.out_proj, "weight", tp_mesh, Shard(1))
    _distribute(mixer.norm, "weight", tp_mesh, Shard(0))
    for name in ("dt_bias", "A_log", "D"):
        _distribute(mixer, name, tp_mesh, Shard(0))
    local_sizes = dict(
        num_heads=mixer.num_heads // tp, num_groups=mixer.num_groups // tp,
        d_inner=mixer.d_inner // tp, conv_dim=mixer.conv_dim // tp,
    )
    # in_proj and conv1d stay plain parameters, sharded by FSDP2 over DP x TP (see
    # `packed_tp_modules`); each rank computes with its rows of the unsharded weight.
    in_proj, conv = mixer.in_proj, mixer.conv1d
    in_proj.forward = lambda x: F.linear(x, local_param(in_proj.weight, in_rows.to(x.device)))

    def conv_forward(x):
        rows = conv_rows.to(x.device)
        bias = None if conv.bias is None else local_param(conv.bias, rows)
        return F.conv1d(x, local_param(conv.weight, rows), bias, conv.stride, conv.padding,
                        conv.dilation, local_sizes["conv_dim"])

    conv.forward = conv_forward
    mixer._nemotron_packed_tp = (in_proj, conv)
    inner = mixer.forward

    def forward(u):
        full = gather_from_shards(u, tp_mesh, 1)
        swaps = [
            (mixer.out_proj, "weight", local_param(mixer.out_proj.weight)),
            (mixer.norm, "weight", local_param(mixer.norm.weight)),
        ] + [(mixer, n, local_param(getattr(mixer, n))) for n in ("dt_bias", "A_log", "D")]
        attrs = [(mixer, k, v) for k, v in local_sizes.items()]
        attrs += [(mixer.norm, "num_groups", local_sizes["num_groups"])]
        with local_view(swaps, attrs):
            out = inner(full)
        return reduce_to_shards(out, tp_mesh, 1)

    mixer.forward = forward


def packed_tp_modules(model: nn.Module) -> list[nn.Module]:
    """Modules whose weights pack several TP-sharded segments (Mamba in_proj z|x|B|C|dt and
    conv1d x|B|C): kept as plain parameters that FSDP2 shards over DP x TP, every TP rank
    computing with its own rows and contributing a partial gradient."""
    return [m for mixer in model.modules() for m in getattr(mixer, "_nemotron_packed_tp", ())]


def _moe(moe: nn.Module, tp_mesh, cp=None) -> None:
    router = moe.router
    _distribute(router, "weight", tp_mesh, Replicate())
    router_forward = router.forward

    def route(x):
        with local_view([(router, "weight", local_param(router.weight))], []):
            return router_forward(x)

    router.forward = route
    if moe.shared_experts is not None:
        _mlp(moe.shared_experts, tp_mesh, token_dim=0)
    install_sequence_sharded_moe_forward(moe, tp_mesh, cp)


def install_sequence_sharded_moe_forward(moe: nn.Module, tp_mesh=None, cp=None) -> None:
    """MoE forward for a rank holding part of each sequence (its sequence-parallel shard over
    `tp_mesh` and/or its context-parallel chunks, `cp` a `ContextParallel`): routes only its own
    tokens, but computes the sequence balance loss on the whole sequence's scores."""
    from nemotron.models.nano3.moe import sequence_balance_loss

    def forward(x):
        """x: this rank's part of the sequences [batch, seq_local, hidden]."""
        b, s, h = x.shape
        flat = x.reshape(-1, h)
        r = moe.router(flat)
        rows, counts, ctx = moe.dispatcher.dispatch(flat, r.topk_idx, r.topk_weight)
        y = moe.dispatcher.combine(moe.experts(rows, counts), ctx)
        if moe.shared_experts is not None:
            y = y + moe.shared_experts(flat)
        scores, topk = r.scores.view(b, s, -1), r.topk_idx.view(b, s, -1)
        if tp_mesh is not None:
            # identical on TP peers; each one's gradient covers its own shard (summed over TP)
            scores = DTensor.from_local(scores, tp_mesh, [Shard(1)]).full_tensor()
            with torch.no_grad():
                topk = DTensor.from_local(topk, tp_mesh, [Shard(1)]).full_tensor()
        if cp is not None:
            # every CP rank computes the whole loss; the gather's backward sums their gradients
            # (FSDP2 then averages over DP x CP)
            scores = cp.gather_sequence(scores)
            with torch.no_grad():
                topk = cp.gather_sequence(topk)
        return y.view(b, s, h), sequence_balance_loss(scores, topk, moe.top_k)

    moe.forward = forward


# -- vocab-parallel loss ------------------------------------------------------------------------

class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Token cross-entropy from vocab-sharded logits [N, V/TP]: three all-reduces of [N]
    vectors instead of gathering [N, V]. (`torch.distributed.tensor.parallel.loss_parallel`
    does the same but needs the backward inside its context, which the training loop is not.)"""

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, group):
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
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), safe, here)
        return sum_exp.log() - target

    @staticmethod
    def backward(ctx, grad):
        softmax, safe, here = ctx.saved_tensors
        grad_logits = softmax * grad.unsqueeze(-1)
        grad_logits.scatter_add_(-1, safe.unsqueeze(-1), -(grad * here).unsqueeze(-1))
        return grad_logits, None, None, None


def vocab_parallel_cross_entropy(logits_local: torch.Tensor, labels: torch.Tensor,
                                 vocab_start: int, group) -> torch.Tensor:
    """Per-token loss [N] (identical on every TP rank) from local logits [N, V/TP]."""
    return _VocabParallelCrossEntropy.apply(logits_local, labels, vocab_start, group)


# Tokens (gathered over TP) whose vocab-shard logits one piece of the loss materialises: at
# V/TP = 16K, 512 MiB of fp32 logits, whatever the sequence length (the long-context phase has
# 64K tokens per rank under TP8 CP8).
LOSS_CHUNK_TOKENS = 8192


def _causal_lm_forward(model: nn.Module, tp_mesh) -> None:
    from nemotron.models.nano3.model import Nano3Output

    group = tp_mesh.get_group()
    tp = tp_mesh.size()
    vocab_start = tp_mesh.get_local_rank() * (model.config.vocab_size // tp)

    def piece_loss(hidden_piece, piece_labels):
        logits_local = model.lm_head(hidden_piece)  # gathers the piece over TP: [b, TP*c, V/TP]
        return vocab_parallel_cross_entropy(
            logits_local.flatten(0, -2), piece_labels.reshape(-1), vocab_start, group)

    def forward(input_ids, labels=None, loss_mask=None):
        hidden, aux_loss = model.backbone(input_ids)  # [b, s/TP, h]: this rank's sequence shard
        if labels is None:
            logits_local = model.lm_head(hidden)  # [b, s, V/TP]
            logits = DTensor.from_local(logits_local, tp_mesh, [Shard(-1)]).full_tensor()
            return Nano3Output(loss=None, lm_loss=None, aux_loss=aux_loss, logits=logits)
        weights = (labels != IGNORE_INDEX).to(torch.float32)
        if loss_mask is not None:
            weights = weights * loss_mask.to(torch.float32)
        # The loss in pieces of the local sequence shard, each recomputed in backward
        # (activation checkpointing), so only one piece's logits are ever alive. Piece i
        # gathers local positions [i*c, (i+1)*c) of every TP rank: global positions
        # r*s/TP + i*c + t, rank-major, which is how labels and weights are cut too.
        b, local = hidden.shape[0], hidden.shape[1]
        c = max(1, LOSS_CHUNK_TOKENS // (b * tp))
        by_rank = lambda t: t.reshape(b, tp, local)  # noqa: E731
        loss_sum = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, local, c):
            end = min(start + c, local)
            piece_labels = by_rank(labels)[:, :, start:end]
            piece_weights = by_rank(weights)[:, :, start:end].reshape(-1)
            if local > c:
                token_loss = torch.utils.checkpoint.checkpoint(
                    piece_loss, hidden[:, start:end], piece_labels, use_reentrant=False)
            else:
                token_loss = piece_loss(hidden, piece_labels)
            loss_sum = loss_sum + (token_loss * piece_weights).sum()
        lm_loss = loss_sum / weights.sum().clamp(min=1.0)
        loss = lm_loss
        if model.training and aux_loss is not None and model.config.moe_seq_aux_loss_coeff > 0:
            loss = lm_loss + model.config.moe_seq_aux_loss_coeff * aux_loss
        return Nano3Output(loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, logits=None)

    model.forward = forward


def apply_tensor_parallel(model: nn.Module, mesh: ParallelMesh, cp=None) -> None:
    """Shard a `Nano3ForCausalLM` over the TP mesh with sequence parallel (see module doc);
    `cp`: the `ContextParallel` of this rank, if any (for the MoE balance loss)."""
    from nemotron.models.nano3.attention import Attention
    from nemotron.models.nano3.mamba2 import Mamba2Mixer
    from nemotron.models.nano3.mlp import MLP
    from nemotron.models.nano3.moe import MoE

    tp_mesh = mesh.tp_mesh
    if model.config.tie_word_embeddings:
        raise NotImplementedError("tensor parallel with tied embeddings is not supported")
    parallelize_module(model.backbone.embeddings, tp_mesh,
                       RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)))
    for block in model.backbone.layers.values():
        _norm_on_local_tokens(block.norm, tp_mesh)
        mixer = block.mixer
        if isinstance(mixer, Attention):
            _attention(mixer, tp_mesh)
        elif isinstance(mixer, Mamba2Mixer):
            _mamba(mixer, tp_mesh)
        elif isinstance(mixer, MoE):
            _moe(mixer, tp_mesh, cp)
        elif isinstance(mixer, MLP):
            _mlp(mixer, tp_mesh, token_dim=1)
        else:
            raise NotImplementedError(f"no tensor-parallel plan for {type(mixer).__name__}")
    _norm_on_local_tokens(model.backbone.norm_f, tp_mesh)
    parallelize_module(model.lm_head, tp_mesh, ColwiseParallel(input_layouts=Shard(1)))
    _causal_lm_forward(model, tp_mesh)
