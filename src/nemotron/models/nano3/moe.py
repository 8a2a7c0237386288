"""Mixture of experts: router + dispatcher + experts (+ the shared expert), each swappable.

- `Router`: float32 sigmoid scores; the top-k experts are *chosen* on `scores + expert_bias`
  (the aux-loss-free balancing bias, updated outside the forward pass by
  `nemotron.train.balancing`) but *weighted* by the unbiased scores of the chosen experts,
  renormalised to sum 1 and times `routed_scaling_factor`.
- `LocalDispatcher`: sorts the (token, expert) assignments by expert, no token dropping. The
  expert-parallel all-to-all dispatcher in `nemotron.distributed` has the same interface
  (`Dispatcher`); `MoE(config, dispatcher=...)` takes either.
- `GroupedExperts`: all routed experts' weights as 3-D tensors, computed with one grouped GEMM
  per projection where PyTorch has one for the device and dtype, else a per-expert loop.

`MoE.sequence_gather` (models/nano3/parallel.py) is the one extension point a parallel layout
sets: when a rank holds only part of each sequence, the balance loss gathers the router's
scores of the whole sequence through it.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nemotron.kernels import fast_paths_enabled
from nemotron.kernels.add_n import add_n
from nemotron.kernels.fp32_linear import fp32_linear
from nemotron.kernels.moe_combine import weighted_combine
from nemotron.kernels.moe_router import check_top_k, route_topk, top_k_experts
from nemotron.models.nano3.config import Nano3Config
from nemotron.models.nano3.mlp import MLP, relu2
from nemotron.models.nano3.parallel import SequenceGather

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without torch.distributed: no expert parallelism either
    DTensor = ()  # type: ignore[assignment,misc]


def _inside_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a non-reentrant activation recompute).
    A compiled graph never re-runs Python in backward, so there the answer is always False."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def count_per_expert(
    topk_idx: torch.Tensor, num_experts: int, padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """int64 [num_experts]: how many (token, slot) pairs chose each expert, padding tokens
    (`padding_mask` [tokens] True) not counted. Static-shape (unlike `bincount`, so
    `torch.compile` keeps it in the graph); integer adds are deterministic."""
    flat = topk_idx.reshape(-1)
    ones = torch.ones_like(flat)
    if padding_mask is not None:
        ones = (~padding_mask).to(flat.dtype).unsqueeze(-1).expand_as(topk_idx).reshape(-1)
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, ones)


class RouterOutput(NamedTuple):
    topk_idx: torch.Tensor  # [tokens, k] int64, chosen experts
    topk_weight: torch.Tensor  # [tokens, k] float32, their combine weights
    scores: torch.Tensor  # [tokens, experts] float32 sigmoid scores (unbiased)


class Router(nn.Module):
    expert_bias: torch.Tensor  # buffers, registered in __init__
    tokens_per_expert: torch.Tensor

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, routed_scaling_factor: float, init_std: float
    ) -> None:
        super().__init__()
        check_top_k(top_k, num_experts)
        self.num_experts = num_experts
        self.top_k = top_k
        self.routed_scaling_factor = routed_scaling_factor
        self.init_std = init_std
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        # Saved in checkpoints (HF: gate.e_score_correction_bias); only used to choose experts.
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        # Tokens routed to each expert since the last balancing update; not saved.
        self.register_buffer(
            "tokens_per_expert", torch.zeros(num_experts, dtype=torch.float32), persistent=False
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)
        self.expert_bias.zero_()
        self.tokens_per_expert.zero_()

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` / `.half()` / `.double()` must not change the balancing state's precision:
        # bias updates of 1e-3 vanish in bfloat16. Device moves still apply.
        before = self.weight.data  # the weight's values before `fn` (which may round them)
        super()._apply(fn, recurse)
        for name in ("expert_bias", "tokens_per_expert"):
            buf = getattr(self, name)
            if buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        # Nor the router weight's, which stays at least float32 (a float64 oracle keeps float64):
        # its logits are float32 (reference.md §1), and transformers keeps `gate.weight` float32
        # in a bf16 NemotronH (`_keep_in_fp32_modules_strict`), so a bf16 model (`.bfloat16()`,
        # `load_hf(dtype=torch.bfloat16)`) routes as transformers' does. The values are taken
        # from before the cast, moved to the new device; assigning `.data` keeps the Parameter
        # object (optimizers hold it). Training's bf16 compute weights come from FSDP2's
        # mixed-precision policy over float32 parameters, not from here.
        weight = self.weight
        if weight.is_floating_point() and weight.dtype not in (torch.float32, torch.float64):
            weight.data = before.to(device=weight.device, dtype=torch.float32)
            if weight.grad is not None:
                weight.grad = weight.grad.float()
        return self

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> RouterOutput:
        """x [tokens, hidden] -> RouterOutput. `padding_mask` [tokens], True at padding (a
        mixed-length micro-batch's): those tokens are routed like any other (their outputs
        are never read) but not counted for the balancing bias."""
        # The router is always float32, autocast or not (on CUDA: float32-accurate bf16 GEMMs).
        logits = fp32_linear(x, self.weight)
        scores, topk_idx, weights = route_topk(
            logits, self.expert_bias, self.top_k, self.routed_scaling_factor
        )
        # Count only real training forward passes: not eval, not no_grad, not a recompute.
        if self.training and torch.is_grad_enabled() and not _inside_backward():
            with torch.no_grad():
                self.tokens_per_expert += count_per_expert(topk_idx, self.num_experts, padding_mask).to(
                    self.tokens_per_expert.dtype
                )
        return RouterOutput(topk_idx, weights, scores)


def sequence_balance_loss(
    scores: torch.Tensor, topk_idx: torch.Tensor, top_k: int, padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over sequences (coefficient not applied).

    Per sequence of length S with E experts: `sum_i f_i * P_i` where `f_i = E / (k S) * #tokens
    with expert i among their top k` and `P_i = mean over tokens of scores_i / sum_j scores_j`.
    It is 1 when routing is perfectly uniform.

    scores [batch, seq, E] float32, unbiased; topk_idx [batch, seq, k]: each token's top k of
    those unbiased scores (DeepSeek-V3 eq. 18; `MoE.forward` passes them, not the experts the
    balancing bias chose, as Megatron-Core's `compute_routing_scores_for_aux_loss` does).
    `padding_mask` [batch, seq], True at a mixed-length micro-batch's padding: each sequence is
    then its own tokens only (S its length, padding in neither f nor P), so a padded sequence
    scores as it would alone in a micro-batch of 1. (Megatron-Core's padding mask also drops
    padding from both, but divides every sequence by the micro-batch's mean length.)
    """
    b, s, e = scores.shape
    probs = scores / (scores.sum(-1, keepdim=True) + 1e-20)
    if padding_mask is not None:
        real = (~padding_mask).to(scores.dtype)  # [b, s]
        lengths = real.sum(1, keepdim=True).clamp_min(1.0)  # [b, 1]; a row is never all padding
        with torch.no_grad():
            counts = torch.zeros(b, e, dtype=scores.dtype, device=scores.device)
            counts.scatter_add_(
                1, topk_idx.reshape(b, -1), real.unsqueeze(-1).expand(b, s, top_k).reshape(b, -1)
            )
            f = counts * (e / top_k) / lengths
        return (f * (probs * real.unsqueeze(-1)).sum(1) / lengths).sum(-1).mean()
    with torch.no_grad():
        counts = torch.zeros(b, e, dtype=scores.dtype, device=scores.device)
        counts.scatter_add_(
            1, topk_idx.reshape(b, -1), torch.ones_like(topk_idx.reshape(b, -1), dtype=scores.dtype)
        )
        f = counts * (e / (top_k * s))
    return (f * probs.mean(1)).sum(-1).mean()


def narrow_expert_ids(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert ids in the narrowest integer type that holds them: a GPU radix sort makes one pass
    per key byte, so uint8 keys (up to 256 experts) sort in 1 pass instead of int64's 8."""
    if num_experts <= 256:
        return ids.to(torch.uint8)
    return ids.to(torch.int16) if num_experts <= 32768 else ids


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """`position` with position[order[j]] = j."""
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    return position


class _GatherTokenRows(torch.autograd.Function):
    """rows[j] = x[order[j] // k] (each token copied once per chosen expert, in expert order).

    One row gather forward; backward gathers the k copies of each token back into place and
    sums them (deterministic: no scatter-add). Replaces expand + permute-copy, whose backward
    was an element-indexed gather with an int64 index as large as the activations."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, position: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(position)
        ctx.k = k
        return x.index_select(0, torch.div(order, k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (position,) = ctx.saved_tensors
        return sum_token_row_grads(grad, position, ctx.k), None, None, None


def sum_token_row_grads(grad: torch.Tensor, position: torch.Tensor, k: int) -> torch.Tensor:
    """The dispatch gather's backward: each token's gradient, the sum of its k rows' (sorted rows,
    `position` = inverse of the gather's order): the combine with unit weights, deterministic."""
    ones = torch.ones(position.numel() // k, k, device=grad.device, dtype=torch.float32)
    return weighted_combine(grad, None, position, ones)


def gather_token_rows(x: torch.Tensor, order: torch.Tensor, position: torch.Tensor, k: int) -> torch.Tensor:
    """rows[j] = x[order[j] // k] with a deterministic backward (`position` = inverse of `order`):
    the dispatch gather of the local and the expert-parallel dispatchers."""
    return _GatherTokenRows.apply(x, order, position, k)


class _FanOutInput(torch.autograd.Function):
    """x -> (x for the router, x for the dispatch, x for the shared expert): three views.

    The same values as using x three times; the backward sums the three input gradients with one
    `add_n` pass (fp32, rounded once to x's dtype) instead of two autograd adds. The router
    takes x itself, not a float32 copy: `fp32_linear` computes in float32 from bf16 operands
    (a float32 copy of bf16 values would be split into three bf16 terms, two of them zero)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, side_stream=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)  # an unused output gives None, not a zero tensor
        ctx.dtype = x.dtype
        ctx.side_stream = side_stream
        return x.view_as(x), x.view_as(x), x.view_as(x)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:
        if ctx.side_stream is not None:
            # The shared expert's backward ran on the side stream (autograd runs each backward
            # op on its forward op's stream), its weight gradients possibly after the input
            # gradient this node waited for: join them all before anything downstream (FSDP2's
            # gradient reduction, the optimizer) reads them.
            torch.cuda.current_stream(ctx.side_stream.device).wait_stream(ctx.side_stream)
        return _sum_gradients(grads, ctx.dtype), None


def _sum_gradients(grads, dtype: torch.dtype) -> torch.Tensor | None:
    present = [g for g in grads if g is not None]
    if len(present) <= 1:
        return present[0].to(dtype) if present else None
    return add_n(present, dtype)


class DispatchContext(NamedTuple):
    order: torch.Tensor  # sorted row j holds (token, slot) pair order[j] (pair = token * k + slot)
    topk_weight: torch.Tensor  # [tokens, k]
    position: torch.Tensor | None = None  # inverse of `order`: pair p sits in sorted row position[p]


class Dispatcher(Protocol):
    """Moves token rows to their experts and back (`LocalDispatcher`, or the expert-parallel
    `nemotron.distributed.expert_parallel.AllToAllDispatcher`)."""

    # Whether the MoE may run its shared expert on a side CUDA stream beside dispatch/combine.
    shared_expert_side_stream: bool

    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """x [tokens, hidden] -> (rows sorted by local expert, rows per local expert, context)."""
        ...

    def combine(self, expert_out: torch.Tensor, ctx: Any, add: torch.Tensor | None = None) -> torch.Tensor:
        """Expert outputs -> [tokens, hidden], weighted over the k choices, plus `add`."""
        ...


class LocalDispatcher:
    """Single-device dispatch: sort (token, slot) pairs by expert; combine un-sorts and weights."""

    # the shared expert may run on a side CUDA stream beside dispatch/combine (MoE.forward)
    shared_expert_side_stream = True

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def dispatch(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchContext]:
        """x [tokens, hidden] -> (rows sorted by expert [tokens*k, hidden], counts [E] int64, ctx)."""
        order, position, counts = self.sort_by_expert(topk_idx)
        rows = gather_token_rows(x, order, position, topk_idx.shape[1])
        return rows, counts, DispatchContext(order, topk_weight, position)

    def sort_by_expert(self, topk_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """topk_idx [tokens, k] -> (order, its inverse `position`, counts [E] int64): sorted row j
        holds (token, slot) pair order[j] (pair = token * k + slot)."""
        flat = topk_idx.reshape(-1)
        # stable: within an expert, tokens stay in order
        order = torch.argsort(narrow_expert_ids(flat, self.num_experts), stable=True)
        return order, inverse_permutation(order), count_per_expert(flat, self.num_experts)

    def combine(
        self, expert_out: torch.Tensor, ctx: DispatchContext, add: torch.Tensor | None = None
    ) -> torch.Tensor:
        """expert_out [tokens*k, hidden] (sorted rows) -> [tokens, hidden], weighted sum over k,
        plus `add` [tokens, hidden] (the shared expert's output) in the same pass when given."""
        position = ctx.position if ctx.position is not None else inverse_permutation(ctx.order)
        return weighted_combine(expert_out, ctx.order, position, ctx.topk_weight, add)


def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _can_use_grouped_mm(x: torch.Tensor, *dims: int) -> bool:
    # PyTorch's grouped GEMM kernels: CUDA, bfloat16, 16-byte aligned rows; off under
    # `nemotron.kernels.fast_paths(False)` (the per-expert loop is the reference path).
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and _grouped_mm_fn() is not None
        and all(d % 8 == 0 for d in dims)
        and fast_paths_enabled()
    )


class GroupedExperts(nn.Module):
    """`num_experts` squared-ReLU MLPs: up_proj [E, ffn, hidden], down_proj [E, hidden, ffn]."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        init_std: float,
        output_init_std: float,
    ) -> None:
        super().__init__()
        self.init_std = init_std
        self.output_init_std = output_init_std
        self.up_proj = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.up_proj, std=self.init_std)
        nn.init.normal_(self.down_proj, std=self.output_init_std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [rows, hidden] sorted by expert, counts [E] rows per expert -> [rows, hidden]."""
        return self.mlp(x, counts, local_experts(self.up_proj), local_experts(self.down_proj))

    @staticmethod
    def mlp(x: torch.Tensor, counts: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """The experts' MLPs on this rank's weights `up` [E, ffn, hidden], `down` [E, hidden, ffn]
        (what `forward` runs; experts modules that hold their weights in another form call it
        with plain tensors)."""
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, up, down = x.to(dtype), up.to(dtype), down.to(dtype)
        if _can_use_grouped_mm(x, up.shape[1], up.shape[2]) and up.dtype == down.dtype == x.dtype:
            grouped_mm = _grouped_mm_fn()
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            # Operands are already in the compute dtype; keep autocast from re-casting them.
            with torch.autocast(device_type=x.device.type, enabled=False):
                h = relu2(grouped_mm(x, up.transpose(-2, -1), offs=offs))
                return grouped_mm(h, down.transpose(-2, -1), offs=offs)
        return GroupedExperts._forward_loop(x, counts, up, down)

    @staticmethod
    def _forward_loop(
        x: torch.Tensor, counts: torch.Tensor, up: torch.Tensor, down: torch.Tensor
    ) -> torch.Tensor:
        outs = [
            F.linear(relu2(F.linear(rows, up[e])), down[e])
            for e, rows in enumerate(torch.split(x, counts.tolist()))
        ]
        return torch.cat(outs) if outs else x.new_empty(0, down.shape[1])


def local_experts(weight: torch.Tensor) -> torch.Tensor:
    """This rank's experts' weights. Under expert parallelism the weights are a DTensor (Shard(0)
    of the global [E, ...] tensor, so checkpoints keep the global layout) and the dispatcher
    sends each rank only rows for its own experts; the grouped GEMM runs on the local shard (as
    torchtitan's GroupedExperts does). Every experts module (e.g. train/fp8.py's) reads its weights
    through this."""
    return weight.to_local() if isinstance(weight, DTensor) else weight  # type: ignore[union-attr]


class MoE(nn.Module):
    """Routed experts plus the always-on shared expert. `router`, `dispatcher` and `experts` are
    the three swappable components (defaults from `config`)."""

    def __init__(
        self,
        config: Nano3Config,
        *,
        router: Router | None = None,
        dispatcher: Dispatcher | None = None,
        experts: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.top_k = config.moe_top_k
        self.router = router or Router(
            config.hidden_size,
            config.num_experts,
            config.moe_top_k,
            config.moe_routed_scaling_factor,
            config.init_std,
        )
        if (self.router.top_k, self.router.num_experts) != (config.moe_top_k, config.num_experts):
            # The balance loss (and the FLOP count, the checkpoint's architecture) take k and E
            # from the config: a router choosing another k would be scored as a different model.
            raise ValueError(
                f"MoE: the given router takes top {self.router.top_k} of {self.router.num_experts} "
                f"experts, the config top {config.moe_top_k} of {config.num_experts}"
            )
        self.dispatcher: Dispatcher = dispatcher or LocalDispatcher(config.num_experts)
        self.experts = experts or GroupedExperts(
            config.num_experts,
            config.hidden_size,
            config.moe_ffn_hidden_size,
            config.init_std,
            config.output_init_std,
        )
        self.shared_experts = (
            MLP(
                config.hidden_size,
                config.moe_shared_expert_hidden_size,
                config.init_std,
                config.output_init_std,
            )
            if config.moe_shared_expert_hidden_size > 0
            else None
        )
        # Off by default; `set_shared_expert_overlap` / train.moe_shared_expert_overlap switch it.
        self.shared_expert_overlap = False
        # Extension point (models/nano3/parallel.py): set when this rank holds part of every
        # sequence (sequence / context parallel); the balance loss then sees whole sequences.
        self.sequence_gather: SequenceGather | None = None

    def forward(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [batch, seq, hidden] -> (y [batch, seq, hidden], sequence balance loss, a scalar).
        Under sequence / context parallelism x is this rank's part of the sequences; it routes
        its own tokens. `padding_mask` [batch, seq] (as the model was fed it: under sequence
        parallelism this takes its own shard), True at the padding of a mixed-length
        micro-batch: left out of the expert counts and of the balance loss."""
        b, s, h = x.shape
        if padding_mask is not None and self.sequence_gather is not None:
            padding_mask = self.sequence_gather.local_sequence(padding_mask)
        flat = x.reshape(-1, h)
        side = self._overlap_stream(flat)
        if fast_paths_enabled():
            # one fused pass sums the input's three gradients in backward
            router_in, dispatch_in, shared_in = _FanOutInput.apply(flat, side)
        else:
            router_in = dispatch_in = shared_in = flat
        shared = None
        if side is not None:
            # The shared expert on a side stream, beside the routed path's chain of small
            # latency-bound kernels (router, top-k, sort, gathers); joined before the combine.
            main = torch.cuda.current_stream(flat.device)
            side.wait_stream(main)
            assert self.shared_experts is not None  # `_overlap_stream` checked it
            with torch.cuda.stream(side):
                shared = self.shared_experts(shared_in)
            flat.record_stream(side)  # read on the side stream: keep its memory until then
        route = self.router(router_in, None if padding_mask is None else padding_mask.reshape(-1))
        rows, counts, ctx = self.dispatcher.dispatch(dispatch_in, route.topk_idx, route.topk_weight)
        expert_out = self.experts(rows, counts)
        if side is not None:
            main.wait_stream(side)
            assert shared is not None
            shared.record_stream(main)  # made on the side stream, used and freed on this one
        elif self.shared_experts is not None:
            shared = self.shared_experts(shared_in)
        # the shared expert's output is added inside the combine pass
        y = self.dispatcher.combine(expert_out, ctx, add=shared)
        scores = route.scores.view(b, s, -1)
        # The balance loss counts each token's top-k of the UNBIASED scores (DeepSeek-V3's
        # f_i, Megatron-Core's routing map for aux losses), not the experts the bias chose: the
        # loss measures the router's own preference, which the bias is there to correct.
        with torch.no_grad():
            topk_idx = top_k_experts(scores, self.top_k)
        if self.sequence_gather is not None:
            # A whole-sequence statistic: every rank computes it on the gathered sequences.
            scores = self.sequence_gather.gather_sequence(scores)
            with torch.no_grad():
                topk_idx = self.sequence_gather.gather_sequence(topk_idx)
                if padding_mask is not None:  # as bytes: not every backend gathers bool
                    padding_mask = self.sequence_gather.gather_sequence(padding_mask.to(torch.uint8)).bool()
        return y.view(b, s, h), sequence_balance_loss(scores, topk_idx, self.top_k, padding_mask)

    def _overlap_stream(self, x: torch.Tensor):
        """The side stream for the shared expert when `shared_expert_overlap` is on and applies
        (CUDA, fast paths, a dispatcher that allows it, tokens not sharded over ranks (under
        sequence parallelism the shared expert itself is tensor parallel), not while compiling),
        else None."""
        if not (
            self.shared_expert_overlap
            and x.is_cuda
            and self.shared_experts is not None
            and fast_paths_enabled()
            and self.dispatcher.shared_expert_side_stream
            and self.sequence_gather is None
            and not torch.compiler.is_compiling()
        ):
            return None
        return _side_stream(x.device)


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device, shared by every MoE layer (they run one after another)."""
    device = torch.device(
        device.type, device.index if device.index is not None else torch.cuda.current_device()
    )
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


def set_shared_expert_overlap(model: nn.Module, enabled: bool) -> int:
    """Switch the shared-expert/routed-path stream overlap on or off in every MoE layer of
    `model` (a block or a whole model); returns how many layers it set."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for layer in layers:
        layer.shared_expert_overlap = bool(enabled)
    return len(layers)
