"""Float32 weight gradients for the BF16 routed experts (`train.experts_float32_grads`).

Under FSDP2's BF16 parameter dtype every weight the model reads is a BF16 copy, so autograd
hands each weight gradient back in BF16: the routed experts' grouped GEMM (`torch._grouped_mm`)
writes its float32 sums rounded to BF16, and FSDP2 converts them to float32 for the reduction
and the optimizer. Megatron-LM writes weight gradients into float32 (gradient-accumulation
fusion). The key means the same for the FP8 experts (`train.fp8_grouped`: whose FP8 forms FSDP2
gathers, `train.fp8_gather`, their unit keeps the float32 master dtype; without the key their
products are rounded to BF16 as these are). Measured on one H200 (docs/benchmarks.md,
sixteenth and seventeenth rounds): float32 gradients in the FP8 experts alone moved the
FP8-vs-BF16 loss after 300 steps by ~0.018; in the BF16 experts they did not move BF16's.

With the key on, every BF16 `GroupedExperts` becomes a `Float32GradExperts` (module swap before
sharding; the same `up_proj` / `down_proj` parameters, no copy) whose weights are
`ExpertBf16MasterWeight`s: FSDP2 gathers them as the BF16 copy it would have gathered anyway
(`fsdp_pre_all_gather` rounds the local shard; same bytes moved, same memory), but hands the
model an `ExpertBf16Weight`, a tensor of the master dtype (float32) holding that BF16 copy. Its
experts' MLP (`bf16_expert_mlp`) multiplies in BF16 exactly as `GroupedExperts` does (the same
grouped GEMMs and squared ReLU, forward and input gradients bit for bit), and writes the two
weight gradients in float32 (`kernels.expert_wgrad`: a Triton grouped product over each
expert's rows, float32 sums stored as they are); over a step's micro-batches it sums them into
one float32 buffer in that product (`kernels.fp8.summed_weight_grads`). FSDP2's unit for the
experts keeps the float32 dtype (`distributed/apply.py`), so nothing rounds them.

Outside FSDP2 (one process with float32 compute weights: `train.compute_weights`) there is no
BF16 copy and nothing changes. FP8 experts (`train.fp8` with `experts` in its layers) are not
swapped: they take the key themselves (`apply_fp8`), and need
`train.fp8.experts_fsdp_float8_all_gather` for it (the config check says so).
Checkpoints hold plain tensors (`train.fp8_gather.plain_tensors`): interchangeable with runs
without the key, and `export hf` is unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nemotron.kernels.expert_wgrad import expert_weight_grad
from nemotron.kernels.fp8 import compiled, grad_without_rows, summed_weight_grads_scope
from nemotron.kernels.relu2 import relu2
from nemotron.models.nano3.moe import GroupedExperts, local_experts
from nemotron.train.fp8_gather import ExpertMasterWeight, master_data

__all__ = [
    "ExpertBf16MasterWeight",
    "ExpertBf16Weight",
    "Float32GradExperts",
    "apply_float32_expert_grads",
    "bf16_expert_mlp",
]

aten = torch.ops.aten
CONFIG_KEY = "train.experts_float32_grads"


class ExpertBf16MasterWeight(ExpertMasterWeight):
    """A routed expert weight [E, N, K] (the float32 master copy) that FSDP2 gathers in BF16 and
    hands to the model as an `ExpertBf16Weight` of the master dtype. Every other operation sees
    the wrapped tensor (`ExpertMasterWeight`)."""

    config_key = CONFIG_KEY

    def __repr__(self) -> str:  # type: ignore[override]  # printing must not read the contents
        return f"ExpertBf16MasterWeight({self.data_!r})"

    @staticmethod
    def __tensor_unflatten__(inner: dict, meta: Any, outer_size, outer_stride) -> ExpertBf16MasterWeight:
        return ExpertBf16MasterWeight(inner["data_"])

    @torch.no_grad()
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """This rank's whole experts rounded to BF16 (what FSDP2's BF16 parameter dtype would
        gather), metadata (N, K)."""
        local = self.whole_experts(outer_size)
        return (local.to(torch.bfloat16).contiguous(),), (local.shape[1], local.shape[2])

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        if out is not None:
            # `out`'s view is into the same (re-allocated) buffer
            return None
        n, k = metadata
        (gathered,) = all_gather_outputs
        return ExpertBf16Weight(gathered.view(-1, n, k), dtype=param_dtype), (gathered,)


class ExpertBf16Weight(torch.Tensor):
    """The unsharded routed-expert weight [E, N, K] as FSDP2 gathered it: `bf16`, under the
    master weights' dtype (so autograd keeps its float32 gradient). Only `Float32GradExperts`
    reads it; any other operation on it is an error."""

    bf16: torch.Tensor

    @staticmethod
    def __new__(cls, bf16: torch.Tensor, dtype: torch.dtype) -> ExpertBf16Weight:
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[return-value]
            cls, bf16.shape, dtype=dtype, device=bf16.device
        )

    def __init__(self, bf16: torch.Tensor, dtype: torch.dtype) -> None:
        self.bf16 = bf16

    def __repr__(self) -> str:  # type: ignore[override]  # printing must not read the contents
        return f"ExpertBf16Weight({tuple(self.shape)}, {self.dtype})"

    def __tensor_flatten__(self):
        return ["bf16"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner: dict, dtype, outer_size, outer_stride) -> ExpertBf16Weight:
        return ExpertBf16Weight(inner["bf16"], dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        weight = args[0]
        same_shape = func in (aten.detach.default, aten.alias.default) or (
            func in (aten.as_strided.default, aten.view.default) and list(args[1]) == list(weight.shape)
        )
        if same_shape:
            # FSDP2 and nn.Parameter make aliases of the unsharded parameter: the same copy
            return cls(weight.bf16, weight.dtype)
        raise NotImplementedError(
            f"ExpertBf16Weight: {func} (the routed experts' weights are gathered in BF16 for "
            f"{CONFIG_KEY}; only Float32GradExperts reads them)"
        )


# ---------------------------------------------------------------------------------------------
# The experts' MLP with float32 weight gradients


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """out[rows of e] = a[rows of e] @ b[e] (a [R, K] BF16, b [E, K, N]): PyTorch's grouped GEMM,
    as `GroupedExperts` multiplies (BF16 out)."""
    return torch._grouped_mm(a, b, offs=offs)


def _relu2_and_grad(h_pre: torch.Tensor, grad_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(relu(h_pre)^2, grad_h * 2 relu(h_pre)) in h_pre's dtype, each one rounding of its float32
    value: what `kernels.relu2` computes forward and backward (bit for bit in BF16)."""
    r = torch.relu(h_pre.float())
    return r.square().to(h_pre.dtype), (grad_h.float() * 2.0 * r).to(h_pre.dtype)


def _sum_key(owner: object | None, weight: torch.Tensor, name: str) -> tuple[int, str] | None:
    """Where `kernels.fp8.summed_weight_grads` sums this weight's gradient: float32 gathered
    weights of an experts module (`owner`), while no compiler traces the backward (a traced
    graph would keep one micro-batch's decision for all; autograd then sums)."""
    if owner is None or weight.dtype != torch.float32 or torch.compiler.is_compiling():
        return None
    return (id(owner), f"bf16.{name}")


def _weight_grad(grad: torch.Tensor, inp: torch.Tensor, offs: torch.Tensor, key, dtype: torch.dtype):
    """A weight's gradient for autograd (`kernels.expert_wgrad`, float32), in `dtype`; under an
    open `summed_weight_grads` scope with a `key`, summed into the scope's buffer instead and
    handed over (the sum) at the step's last micro-batch, None before."""
    sums = summed_weight_grads_scope() if key is not None else None
    if sums is None:
        return expert_weight_grad(grad, inp, offs).to(dtype)
    into = sums.buffers.get(key)
    sums.buffers[key] = expert_weight_grad(grad, inp, offs, accumulate_into=into)
    # the scope keeps no reference past the last micro-batch: autograd takes the sum as it is
    return sums.buffers.pop(key) if sums.last else None


def _no_rows_grad(like: torch.Tensor, shape, dtype: torch.dtype, key) -> torch.Tensor | None:
    """A weight's gradient from a micro-batch without rows: zeros; under an open
    `summed_weight_grads` scope what `_weight_grad` would hand over (the sum of the earlier
    micro-batches at the last one, None before)."""
    return grad_without_rows(
        like, shape, dtype, summed_weight_grads_scope() if key is not None else None, key
    )


class _Bf16ExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, up, down, up_bf16, down_bf16, offs, owner):
        ctx.keys = (_sum_key(owner, up, "up_proj"), _sum_key(owner, down, "down_proj"))
        ctx.weights = ((up.shape, up.dtype), (down.shape, down.dtype))
        ctx.no_rows = x.shape[0] == 0
        if ctx.no_rows:
            # an expert-parallel rank that received no rows: nothing to multiply (the grouped
            # GEMM takes no empty input); zero weight gradients, so FSDP2 reduces on every rank
            return x.new_zeros(0, down.shape[1])
        h_pre = _grouped_mm(x, up_bf16.transpose(-2, -1), offs)
        h = relu2(h_pre)
        out = _grouped_mm(h, down_bf16.transpose(-2, -1), offs)
        # h is made again in the backward from h_pre (one elementwise pass, one activation less)
        ctx.save_for_backward(x, h_pre, up_bf16, down_bf16, offs)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.no_rows:
            grads = [
                _no_rows_grad(grad_out, shape, dtype, key)
                for (shape, dtype), key in zip(ctx.weights, ctx.keys, strict=True)
            ]
            return grad_out.new_zeros(0, ctx.weights[0][0][-1]), *grads, None, None, None, None
        x, h_pre, up_bf16, down_bf16, offs = ctx.saved_tensors
        with torch.autocast(device_type=x.device.type, enabled=False):
            # a pipeline schedule runs the backward inside the step's autocast; these products
            # are in the dtypes given here
            return _Bf16ExpertMLP._backward(ctx, grad_out, x, h_pre, up_bf16, down_bf16, offs)

    @staticmethod
    def _backward(ctx, grad_out, x, h_pre, up_bf16, down_bf16, offs):
        (_, up_dtype), (_, down_dtype) = ctx.weights
        grad_out = grad_out.to(torch.bfloat16).contiguous()
        grad_h = _grouped_mm(grad_out, down_bf16, offs)
        h, dh_pre = compiled("relu2_and_grad", _relu2_and_grad, h_pre.device)(h_pre, grad_h)
        del grad_h
        grad_down = _weight_grad(grad_out, h, offs, ctx.keys[1], down_dtype)
        del h
        grad_x = _grouped_mm(dh_pre, up_bf16, offs)
        grad_up = _weight_grad(dh_pre, x, offs, ctx.keys[0], up_dtype)
        return grad_x, grad_up, grad_down, None, None, None, None


def bf16_expert_mlp(
    x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, offs: torch.Tensor, owner: object | None = None
) -> torch.Tensor:
    """The experts' squared-ReLU MLP on x [rows, hidden] sorted by expert (offs [E] int32
    cumulative row counts) with up [E, ffn, hidden] and down [E, hidden, ffn]: `ExpertBf16Weight`s
    (float32 gradients) or plain tensors (gradients in their dtype). BF16 products as
    `GroupedExperts` runs them, BF16 out; the weight gradients are float32 products
    (`kernels.expert_wgrad`) returned in the weights' dtype. `owner` (the experts module) keys
    the sums over micro-batches."""
    up_bf16, down_bf16 = (
        w.bf16 if isinstance(w, ExpertBf16Weight) else w.to(torch.bfloat16).contiguous() for w in (up, down)
    )
    return _Bf16ExpertMLP.apply(x.to(torch.bfloat16).contiguous(), up, down, up_bf16, down_bf16, offs, owner)


class Float32GradExperts(GroupedExperts):
    """The routed experts' squared-ReLU MLPs in BF16 with float32 weight gradients (see the module
    docstring); the same parameters as the `GroupedExperts` it is made from, shared (no copy)."""

    def __init__(self, experts: GroupedExperts) -> None:
        nn.Module.__init__(self)
        self.init_std = experts.init_std
        self.output_init_std = experts.output_init_std
        self.up_proj = experts.up_proj
        self.down_proj = experts.down_proj
        for name in ("up_proj", "down_proj"):
            param = getattr(self, name)
            if not isinstance(param, ExpertBf16MasterWeight):
                wrapped = nn.Parameter(
                    ExpertBf16MasterWeight(param.detach()), requires_grad=param.requires_grad
                )
                setattr(self, name, wrapped)

    def extra_repr(self) -> str:
        return "BF16 products, float32 weight gradients (weights gathered in BF16 by FSDP2)"

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [rows, hidden] sorted by expert, counts [E] rows per expert -> [rows, hidden]."""
        up, down = local_experts(self.up_proj), local_experts(self.down_proj)
        if not isinstance(up, ExpertBf16Weight):
            # not gathered by FSDP2 (no BF16 copy to keep float32 gradients for): as GroupedExperts
            return self.mlp(x, counts, master_data(up), master_data(down))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = bf16_expert_mlp(x, up, down, offs, owner=self)
        return out if torch.is_autocast_enabled(x.device.type) else out.to(x.dtype)


def apply_float32_expert_grads(model: nn.Module) -> int:
    """`train.experts_float32_grads`: every MoE layer's BF16 `GroupedExperts` (not FP8 ones)
    becomes a `Float32GradExperts`, before sharding. Returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if type(experts) is GroupedExperts:
            module.experts = Float32GradExperts(experts)
            swapped += 1
    return swapped
