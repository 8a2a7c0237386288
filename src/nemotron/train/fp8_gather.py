"""The routed experts' FP8 weight forms made by FSDP2's all-gather (`train.fp8.experts_fsdp_float8_all_gather`).

`nemotron.train.fp8_grouped` needs each expert weight in two FP8 forms: per row for the forward
product and transposed (one scale per expert matrix) for the input-gradient product. Made from
the BF16 weight on every call, they cost two quantization passes per weight and micro-batch
(~29 ms per step on the one-GPU proxy); held for the step (`train.fp8.reuse_weights`) they
cost memory the proxy does not have. Here FSDP2 makes them instead of the BF16 copy it would
otherwise gather: the sharded master weight is an `ExpertMasterWeight`, whose
`fsdp_pre_all_gather` quantizes the local shard into both forms (whole experts per rank, so
rows and matrices are whole) as its all-gather inputs, and whose `fsdp_post_all_gather` hands
the model an `ExpertFp8Forms`: views of the gathered outputs, one byte per element per form,
the size of the BF16 weight it replaces. With `train.fsdp_accumulate_unsharded` the weights
are gathered once per optimizer step, so the forms are made once per step at no memory cost;
under data parallelism the all-gather moves the two FP8 forms (as many bytes as BF16).

The values are those `fp8_grouped` computes from the BF16 weight (the master weight is first
rounded to BF16, as the BF16 gather would; on GPUs inside the quantization kernels, without a
BF16 copy), so the forward is unchanged. The experts' FSDP2 unit keeps the master weights'
dtype (`distributed.apply`: no BF16 parameter dtype), so their gradients are float32 tensors:
BF16 weight-gradient products are converted once (as FSDP2 would convert them), FP8 ones are
written in float32 and, over a step's micro-batches, summed in the product itself
(`kernels.fp8.summed_weight_grads`). Each micro-batch's product is rounded to BF16 first, what
the BF16 experts' gradients hold, unless `train.experts_float32_grads` (`fp8_grouped`). Outside
FSDP (no all-gather) the experts see the `ExpertMasterWeight` and quantize per call as usual.
Checkpoints and exports see plain tensors (`plain_tensors`).

The all-gather inputs (`pack_forms`): with several ranks, one per form and scale vector, so
that each gathered output is one form for all experts, contiguous as the grouped products
need; with one rank (no collective: FSDP2 copies only the first input there) a single buffer
holding the four one after another.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.utils._pytree as pytree

from nemotron.kernels import use_triton
from nemotron.kernels.fp8 import FLOAT8, compiled, fp8_hardware, quantize_transposed, rowwise

__all__ = [
    "ExpertFp8Forms",
    "ExpertMasterWeight",
    "master_data",
    "pack_forms",
    "plain_tensors",
    "unpack_forms",
]

aten = torch.ops.aten

# ops whose results are (views or copies of) the master weight itself: they stay wrapped, so
# FSDP2's sharding, `to_empty` and state loading keep the all-gather hooks
_KEEP_WRAPPED = {
    aten.empty_like.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
    aten.new_zeros.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.view.default,
    aten._unsafe_view.default,
    aten.as_strided.default,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.chunk.default,
    aten.clone.default,
    aten.detach.default,
    aten.alias.default,
    aten._to_copy.default,
    aten._pin_memory.default,
}


def _returns_self(func) -> bool:
    """An in-place op (its first return aliases and writes its first argument)."""
    returns = func._schema.returns
    return bool(returns) and returns[0].alias_info is not None and returns[0].alias_info.is_write


class ExpertMasterWeight(torch.Tensor):
    """A routed expert weight [E, N, K] (the master copy, any dtype) that FSDP2 gathers as its
    two FP8 forms (`ExpertFp8Forms`). Every operation other than FSDP's all-gather sees the
    wrapped tensor `data` (optimizer steps, initialisation, state loading)."""

    data_: torch.Tensor
    # read by the distributed layout (`distributed/apply.py`): FSDP2 must shard these by whole
    # experts (dim 0), as `fsdp_pre_all_gather` packs each rank's experts whole, and keeps
    # their unit in the master weights' dtype (their gradients are float32)
    gathers_whole_experts = True
    # the key that turned this gathering on, named by errors (a subclass gathers another form:
    # `train.expert_grads.ExpertBf16MasterWeight`)
    config_key = "train.fp8.experts_fsdp_float8_all_gather"

    @staticmethod
    def __new__(cls, data: torch.Tensor) -> ExpertMasterWeight:
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[return-value]
            cls,
            data.shape,
            strides=data.stride(),
            storage_offset=data.storage_offset(),
            dtype=data.dtype,
            device=data.device,
            layout=data.layout,
            requires_grad=data.requires_grad,
        )

    def __init__(self, data: torch.Tensor) -> None:
        self.data_ = data

    def __repr__(self) -> str:  # type: ignore[override]  # printing must not read the contents
        return f"ExpertMasterWeight({self.data_!r})"

    def __tensor_flatten__(self):
        return ["data_"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict, meta: Any, outer_size, outer_stride) -> ExpertMasterWeight:
        return ExpertMasterWeight(inner["data_"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        first = args[0] if args else None
        args, kwargs_unwrapped = pytree.tree_map_only(cls, lambda t: t.data_, (args, kwargs or {}))
        out = func(*args, **kwargs_unwrapped)
        if _returns_self(func) and isinstance(first, cls):
            return first
        if func in _KEEP_WRAPPED:
            return pytree.tree_map_only(torch.Tensor, cls, out)
        return out

    # -- FSDP2's all-gather extension --------------------------------------------------------

    @torch.no_grad()
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """This rank's whole experts in both FP8 forms (`pack_forms`), metadata (N, K)."""
        local = self.whole_experts(outer_size)
        return pack_forms(local, mesh.size()), (local.shape[1], local.shape[2])

    def whole_experts(self, outer_size) -> torch.Tensor:
        """The wrapped local shard, checked to hold whole experts of the unsharded `outer_size`."""
        local = self.data_
        if tuple(outer_size[1:]) != tuple(local.shape[1:]):
            raise ValueError(
                f"{self.config_key}: FSDP must shard the routed experts by whole experts (dim 0); "
                f"this rank holds {tuple(local.shape)} of {tuple(outer_size)}"
            )
        return local

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        if out is not None:
            # the views of `out` are into the same (re-allocated) buffers
            return None
        n, k = metadata
        forms = ExpertFp8Forms(*unpack_forms(all_gather_outputs, n, k), dtype=param_dtype)
        return forms, tuple(all_gather_outputs)


def master_data(weight: torch.Tensor) -> torch.Tensor:
    """The tensor an `ExpertMasterWeight` wraps (`weight` itself otherwise): what the FP8 path
    quantizes when no all-gather made the forms (one device, no FSDP)."""
    return weight.data_ if isinstance(weight, ExpertMasterWeight) else weight


def pack_forms(w: torch.Tensor, world: int = 1) -> tuple[torch.Tensor, ...]:
    """w [E, N, K] (this rank's whole experts; float32 master weights are quantized from their
    BF16 values, as `fp8_expert_mlp` quantizes the BF16 weight it is handed) -> the all-gather
    inputs of its two FP8 forms (`fp8_grouped`'s quantizations), uint8: with one rank (`world`
    1) a single buffer, form after form (FSDP2's one-rank path copies only the first input);
    with more, four inputs whose gathered outputs are each form for all experts: [E, N, K]
    per-row form, [E, K, N] transposed form, [E, 4 N] and [E, 4 K] their float32 inverse
    scales. Either way each form is contiguous, as the experts' own quantizations are, so the
    grouped products read the same layout gathered or not (timed alternately on an H200: the
    same 1.53 ms per product). On GPUs with FP8 tensor cores two Triton passes write the forms
    straight into the inputs from the float32 weight (`fp8_triton`: the per-row one, then the
    transposed one with the matrix's scale, the largest of its rows'); elsewhere the references
    are copied in. The two passes replace a BF16 copy, a compiled transposed quantization and a
    concatenation, 1.7 ms per proxy weight on an H200 (docs/benchmarks.md, fourteenth round's
    trace; the two passes not yet timed alone)."""
    e, n, k = w.shape
    per_expert = (n * k, k * n, 4 * n, 4 * k)  # bytes of each input per expert
    if world == 1:
        flat = torch.empty(e * sum(per_expert), dtype=torch.uint8, device=w.device)
        buffers = list(torch.split(flat, [e * size for size in per_expert]))
        inputs: tuple[torch.Tensor, ...] = (flat,)
    else:
        buffers = [torch.empty(e, size, dtype=torch.uint8, device=w.device) for size in per_expert]
        inputs = tuple(buffers)
    rows_q = buffers[0].view(FLOAT8).view(e, n, k)
    t_q = buffers[1].view(FLOAT8).view(e, k, n)
    rows_inv = buffers[2].view(torch.float32).view(e, n)
    t_inv = buffers[3].view(torch.float32).view(e, k)
    if e == 0:  # a rank without experts (nothing to quantize)
        return inputs
    if _one_pass(w):
        from nemotron.kernels.fp8_triton import quantize_rows_triton, quantize_transposed_triton

        round_bf16 = w.dtype != torch.bfloat16
        quantize_rows_triton(w, round_bf16=round_bf16, out=(rows_q.view(e * n, k), rows_inv.view(e * n)))
        matrix_inv = rows_inv.amax(-1)
        quantize_transposed_triton(w, matrix_inv, round_bf16=round_bf16, out=t_q)
        t_inv.copy_(matrix_inv[:, None].expand(e, k))
        return inputs
    w = w.to(torch.bfloat16)
    q, inv = rowwise(w)
    qt, inv_t = compiled("transposed", quantize_transposed, w.device)(w, inv.amax(-1))
    for buffer, value in ((rows_q, q), (t_q, qt), (rows_inv, inv), (t_inv, inv_t)):
        buffer.copy_(value)
    return inputs


def _one_pass(w: torch.Tensor) -> bool:
    """Whether `pack_forms` writes the forms with `fp8_triton`'s kernels (a GPU with FP8 tensor
    cores, rows the row kernel holds in registers)."""
    if not (use_triton(w) and fp8_hardware(w.device)):
        return False
    from nemotron.kernels.fp8_triton import MAX_ROW

    return w.shape[-1] <= MAX_ROW


def unpack_forms(
    outputs: tuple[torch.Tensor, ...] | list[torch.Tensor], n: int, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of gathered `pack_forms` outputs (one buffer, or four gathered inputs): (per-row
    form [E, N, K] e4m3, its inverse scales [E, N] float32, transposed form [E, K, N] e4m3, its
    inverse scales [E, K] float32), each contiguous."""
    if len(outputs) == 1:
        flat = outputs[0].reshape(-1)
        e = flat.numel() // (2 * n * k + 4 * (n + k))
        sizes = [e * n * k, e * n * k, 4 * e * n, 4 * e * k]
        rows, trans, rows_scale, trans_scale = torch.split(flat, sizes)
    else:
        rows, trans, rows_scale, trans_scale = outputs
        e = rows.shape[0]
    return (
        rows.view(FLOAT8).view(e, n, k),
        rows_scale.view(torch.float32).view(e, n),
        trans.view(FLOAT8).view(e, k, n),
        trans_scale.view(torch.float32).view(e, k),
    )


class ExpertFp8Forms(torch.Tensor):
    """The unsharded routed-expert weight [E, N, K] as FSDP2 gathered it: its per-row FP8 form
    (`rows_q`, `rows_inv`) and transposed FP8 form (`t_q` [E, K, N], `t_inv` [E, K]). Only
    `fp8_grouped` reads it; any other operation on it is an error (there is no BF16 copy)."""

    rows_q: torch.Tensor
    rows_inv: torch.Tensor
    t_q: torch.Tensor
    t_inv: torch.Tensor

    @staticmethod
    def __new__(cls, rows_q, rows_inv, t_q, t_inv, dtype: torch.dtype) -> ExpertFp8Forms:
        return torch.Tensor._make_wrapper_subclass(  # type: ignore[return-value]
            cls, rows_q.shape, dtype=dtype, device=rows_q.device
        )

    def __init__(self, rows_q, rows_inv, t_q, t_inv, dtype: torch.dtype) -> None:
        self.rows_q, self.rows_inv, self.t_q, self.t_inv = rows_q, rows_inv, t_q, t_inv

    def __repr__(self) -> str:  # type: ignore[override]  # printing must not read the contents
        return f"ExpertFp8Forms({tuple(self.shape)}, {self.dtype})"

    def __tensor_flatten__(self):
        return ["rows_q", "rows_inv", "t_q", "t_inv"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner: dict, dtype, outer_size, outer_stride) -> ExpertFp8Forms:
        return ExpertFp8Forms(inner["rows_q"], inner["rows_inv"], inner["t_q"], inner["t_inv"], dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        forms = args[0]
        same_shape = func in (aten.detach.default, aten.alias.default) or (
            func in (aten.as_strided.default, aten.view.default) and list(args[1]) == list(forms.shape)
        )
        if same_shape:
            # FSDP2 and nn.Parameter make aliases of the unsharded parameter: the same forms
            return cls(forms.rows_q, forms.rows_inv, forms.t_q, forms.t_inv, forms.dtype)
        raise NotImplementedError(
            f"ExpertFp8Forms: {func} (the routed experts' weights are gathered as FP8 forms only; "
            "train.fp8.experts_fsdp_float8_all_gather=false gathers BF16 weights)"
        )


def _wrapped(t: torch.Tensor) -> torch.Tensor | None:
    """The tensor an FP8 all-gather wrapper holds (same storage), None for any other tensor:
    ours (`ExpertMasterWeight`) and torchao's (`WeightWithDynamicFloat8CastTensor`, the dense
    linears' weights with `train.fp8.fsdp_float8_all_gather`, and the optimizer state made
    from them with `zeros_like`). torchao's is looked up only if torchao is already imported:
    nothing else can have made one."""
    if isinstance(t, ExpertMasterWeight):
        return t.data_
    fsdp_utils = sys.modules.get("torchao.float8.fsdp_utils")
    if fsdp_utils is not None and isinstance(t, fsdp_utils.WeightWithDynamicFloat8CastTensor):
        return t._tensor
    return None


def plain_tensors(tree: Any) -> Any:
    """`tree` (a state dict, nested) with every FP8 all-gather wrapper (`_wrapped`), bare or as
    a DTensor's local tensor, replaced by the tensor it wraps (same storage): checkpoints and
    exports hold plain tensors whether or not FP8 gathering was on. (Saved wrapped, torchao's
    would be pickled with its class: such a checkpoint would load only where torchao is
    imported, not in a BF16 run or `export hf`.)"""
    from torch.distributed.tensor import DTensor

    def unwrap(t: torch.Tensor) -> torch.Tensor:
        inner = _wrapped(t)
        if inner is not None:
            return inner
        if isinstance(t, DTensor) and (inner := _wrapped(t._local_tensor)) is not None:
            return DTensor.from_local(
                inner, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
            )
        return t

    return pytree.tree_map_only(torch.Tensor, unwrap, tree)
