"""The routed experts' squared-ReLU MLP with FP8 grouped GEMMs, written for this model's shapes.

    h_pre = x @ up_e^T          (FP8: x per row, up per output row)
    h     = relu(h_pre)^2
    out   = h @ down_e^T        (FP8: h per row, down per output row)

per expert e over its rows of `x` (sorted by expert, `offs` the cumulative row counts).

Why not torchao's FP8 grouped GEMM (`torchao.prototype.moe_training`, measured on an H200 at the
proxy's shapes, docs/benchmarks.md "FP8"): it also runs the weight-gradient products in FP8, which
needs every operand quantized a second time per column within each expert's rows and every
expert's row group padded to 16 rows; those passes cost more than the FP8 GEMMs save. Here:

- forward and input-gradient products run in FP8 (`torch._scaled_grouped_mm`, rowwise scales,
  scales rounded down to powers of two so the descale is exact); they take any group sizes, so
  no padding. `grouped_gemm="triton"` (`train.fp8.experts_grouped_gemm`) runs them with
  `kernels.fp8_grouped_triton` instead, at the configured tiles: the same operands and scales,
  the sums in another order. Fast accumulation maps one to one: on sm_90 Triton's FP8 `tl.dot`
  by default sums a whole contraction in the tensor cores' own accumulator
  (`max_num_imprecise_acc` 2**30 in Triton 3.6 and 3.9), which is CUTLASS's `use_fast_accum`;
  `fast_accum=False` passes a promotion interval (`fp8_grouped_triton.promotion_interval`: into
  a float32 sum every min(BLOCK_K, 128) products, CUTLASS's 128 without fast accumulation).
  The row-tile list is made once per call and shared by its four products; the weights' FP8
  forms, gathered or quantized here, are contiguous and reach the kernel without a copy;
- the weights' transposed copies for the input gradient take one scale per expert matrix, the
  largest of its forward row scales' inverses (exactly the scale of the matrix's amax): one
  read and one transposed write, no reduction over the weight (per-column scales took a
  reduction over each column, 0.53 ms against 0.22-0.27 ms per weight on the H200);
- the weight-gradient products (`weight_grad`, `train.fp8.experts_weight_grad`): "bf16" (the
  default) runs them in BF16 (`torch._grouped_mm`) on BF16 operands, keeping BF16's accuracy
  (torchao's `rowwise_with_gw_hp` makes the same choice for dense linears); "fp8" runs them on
  FP8 operands with one scale per expert (`kernels.fp8_wgrad`): the transposed operands are
  made from the per-row FP8 forms the other products take (dout's, x's, and h's and dh_pre's
  from a one-pass squared-ReLU backward that writes no BF16), a pass reading and writing one
  byte per element, and a Triton grouped product contracts over each expert's rows (1.38-1.46
  ms against BF16's 2.22-2.31 per product on the H200; PyTorch's CUTLASS `_scaled_grouped_mm`
  on the same operands 1.68-1.85). On the proxy the step is 2.0-2.4% faster with it and its
  peak 2.2 GiB lower (docs/benchmarks.md "FP8 training", ninth round);
- the input rows and the output gradient may arrive already in per-row FP8 form (`Fp8Rows`
  from `train.fp8_dispatch`, with FP8 weight gradients): the same values, not quantized again;
- each quantization is one pass: rows by the Triton kernel of `kernels.fp8_triton` (the
  squared ReLU and the quantization of its output are one pass of it); with BF16 weight
  gradients the squared ReLU's backward, the recomputation of `h` for the weight gradient and
  the quantization of the input gradient are one `torch.compile`d pass, with FP8 ones one
  Triton pass (`kernels.fp8.relu2_backward`);
- with an `owner` (the experts module) inside `kernels.fp8.reuse_quantized_weights`
  (`train.fp8.reuse_weights`, off by default), the weights' quantized copies (per row for the
  forward, transposed for the input gradient) are made once per optimizer step instead of per
  micro-batch and held for the step: on the H200 the experts' MLP at the proxy's rows went
  15.17 -> 13.72 ms (BF16 15.55), but holding them (7.7 GB for the one-GPU proxy's 6 MoE
  layers) pushed the proxy, already at 137 of 139 GiB reserved, into allocator retries and
  made its step slower (docs/benchmarks.md "FP8 training").

What is rounded where (the emulated path computes exactly these roundings with float32
products; `tests/train/test_fp8.py` checks both against an independent reference):

    forward      x        per row (over hidden)      up    per (e, ffn row) over hidden
                 h        per row (over ffn)         down  per (e, hidden row) over ffn
    input grad   dout     per row (over hidden)      down  per expert e (its whole matrix)
                 dh_pre   per row (over ffn)         up    per expert e (its whole matrix)
    weight grad  "bf16": BF16 products of the BF16 operands (dout, h; dh_pre, x)
                 "fp8": dout, h, dh_pre, x each per expert (its rows' largest inverse scale),
                        made from their per-row forms above (exact: power-of-two ratios)
                 either: the float32 product rounded to BF16 (what the BF16 experts' weight
                        gradients hold) unless `train.experts_float32_grads`; a step's
                        micro-batches summed in float32 (as FSDP2 sums the BF16 experts')
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import partial

import torch

from nemotron.kernels.expert_wgrad import expert_weight_grad
from nemotron.kernels.fp8 import (
    compiled,
    emulated_mm,
    fp8_hardware,
    grad_without_rows,
    quantize_rows,
    quantize_transposed,
    quantized_weight,
    relu2_backward,
    rowwise,
    summed_weight_grads_scope,
)
from nemotron.kernels.fp8_rows import Fp8Rows, fp8_rows_parts
from nemotron.kernels.fp8_wgrad import ExpertRows, expert_rows, grouped_weight_grad, transposed_groups
from nemotron.train.fp8_config import EXPERT_GROUPED_GEMMS, EXPERT_WEIGHT_GRADS, grouped_tiles_problem
from nemotron.train.fp8_gather import ExpertFp8Forms, master_data

__all__ = ["fp8_expert_mlp", "grouped_product_runs"]


def _relu2_backward_quantize(
    h_pre: torch.Tensor, grad_h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h = relu(h_pre)^2 in h_pre's dtype, dh_pre = grad_h * 2 relu(h_pre) in h_pre's dtype,
    and quantize_rows(dh_pre)), one pass."""
    r = torch.relu(h_pre.float())
    h = r.square().to(h_pre.dtype)
    dh_pre = (grad_h.float() * 2.0 * r).to(h_pre.dtype)
    q, inv = quantize_rows(dh_pre)
    return h, dh_pre, q, inv


# ---------------------------------------------------------------------------------------------
# The grouped products


def _scaled_grouped_mm(
    a_q: torch.Tensor,
    a_inv: torch.Tensor,
    b_t_q: torch.Tensor,
    b_inv: torch.Tensor,
    offs: torch.Tensor,
    fast_accum: bool,
) -> torch.Tensor:
    """out[rows of e] = (a_q * a_inv)[rows of e] @ (b_t_q * b_inv)[e]^T in BF16, on the FP8
    tensor cores: a_q [R, K] (scales [R]), b_t_q [E, N, K] contiguous (scales [E, N]).
    `fast_accum`: the tensor cores' own accumulation (`kernels.fp8`, above `tensorwise_mm`)."""
    return torch._scaled_grouped_mm(
        a_q,
        b_t_q.transpose(-2, -1),
        a_inv,
        b_inv,
        offs=offs,
        out_dtype=torch.bfloat16,
        use_fast_accum=fast_accum,
    )


def _emulated_grouped_mm(
    a_q: torch.Tensor,
    a_inv: torch.Tensor,
    b_t_q: torch.Tensor,
    b_inv: torch.Tensor,
    offs: torch.Tensor,
    fast_accum: bool,
) -> torch.Tensor:
    """`_scaled_grouped_mm` with float32 products (any device; `fast_accum` has no emulation),
    each group's result rounded to BF16: `kernels.fp8.emulated_mm` per expert."""
    out = torch.zeros(a_q.shape[0], b_t_q.shape[1], dtype=torch.bfloat16, device=a_q.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = emulated_mm(a_q[start:end], a_inv[start:end], b_t_q[e], b_inv[e])
        start = end
    return out


def _triton_grouped_mm(
    a_q: torch.Tensor,
    a_inv: torch.Tensor,
    b_t_q: torch.Tensor,
    b_inv: torch.Tensor,
    offs: torch.Tensor,
    fast_accum: bool,
    tiles: tuple[int, ...] | None,
    row_tiles: dict,
) -> torch.Tensor:
    """`_scaled_grouped_mm` by `kernels.fp8_grouped_triton` at `tiles` (None: its default).
    `row_tiles`: one `fp8_expert_mlp` call's row-tile list, made by its first product (the
    forward's two and the backward's two take the same rows and groups, `offs`)."""
    from nemotron.kernels.fp8_grouped_triton import DEFAULT_CONFIG, grouped_mm_triton, row_tile_slots
    from nemotron.kernels.fp8_grouped_triton import row_tiles as make_row_tiles

    config = tuple(tiles) if tiles is not None else DEFAULT_CONFIG
    key = a_q.shape[0]
    if key not in row_tiles:
        slots = row_tile_slots(a_q.shape[0], offs.numel(), config[0])
        row_tiles[key] = make_row_tiles(offs, config[0], slots)
    return grouped_mm_triton(
        a_q, a_inv, b_t_q, b_inv, offs, config=config, fast_accum=fast_accum, tiles=row_tiles[key]
    )


def grouped_product_runs(grouped_gemm: str, device: torch.device) -> bool:
    """Whether `grouped_gemm`'s FP8 product can run on `device` (else the experts emulate it):
    on CUDA both can given FP8 tensor cores (`kernels.fp8.fp8_hardware`; an sm_80 GPU has
    none), neither without; on CPU only "triton", in Triton's interpreter (TRITON_INTERPRET=1:
    slow, how the CPU tests run it)."""
    if device.type == "cuda":
        return fp8_hardware(device)
    return grouped_gemm == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def _grouped_product(
    emulate: bool, grouped_gemm: str, tiles: tuple[int, ...] | None, fast_accum: bool
) -> Callable[..., torch.Tensor]:
    """The forward and input-gradient product of one call (the same for its four products)."""
    if emulate:
        return partial(_emulated_grouped_mm, fast_accum=fast_accum)
    if grouped_gemm == "triton":
        return partial(_triton_grouped_mm, fast_accum=fast_accum, tiles=tiles, row_tiles={})
    return partial(_scaled_grouped_mm, fast_accum=fast_accum)


def _grouped_weight_grad(
    grad: torch.Tensor, inp: torch.Tensor, offs: torch.Tensor, float32: bool
) -> torch.Tensor:
    """[E, N, K]: per expert grad[rows]^T @ inp[rows] of the BF16 operands, float32 sums, in BF16;
    `float32`: stored in float32 (`kernels.expert_wgrad`, the BF16 experts' float32 product)."""
    if float32:
        return expert_weight_grad(grad, inp, offs)
    if grad.is_cuda:
        return torch._grouped_mm(grad.transpose(0, 1), inp, offs=offs)
    out = torch.zeros(offs.numel(), grad.shape[1], inp.shape[1], dtype=torch.float32)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[e] = grad[start:end].float().transpose(0, 1) @ inp[start:end].float()
        start = end
    return out.to(grad.dtype)


def _fp8_weight_grad(
    a_q: torch.Tensor,
    a_inv: torch.Tensor,
    b_q: torch.Tensor,
    b_inv: torch.Tensor,
    layout: ExpertRows,
    weight: torch.Tensor,
    key: tuple[int, str] | None,
    float32: bool,
) -> torch.Tensor | None:
    """The gradient autograd gets for `weight` [E, N, K]: per expert a[rows]^T @ b[rows] from the
    row-quantized a [R, N] and b [R, K] (`kernels.fp8_wgrad`: both made transposed with one
    scale per expert, then the FP8 product), in the weight's dtype; unless `float32`, each
    product rounded to BF16 first (what the BF16 experts' gradient holds). Under an open
    `kernels.fp8.summed_weight_grads` scope with a `key` (gathered forms: float32, FSDP2 reduces
    after the last micro-batch) the product is summed into the scope's float32 buffer for
    `key` instead, which is the gradient at the last micro-batch (None before): the sum FSDP2
    would make of the micro-batches' gradients."""
    at, a_e = transposed_groups(a_q, a_inv, layout)
    bt, b_e = transposed_groups(b_q, b_inv, layout)
    product = partial(grouped_weight_grad, at, a_e, bt, b_e, layout, round_bf16=not float32)
    sums = _open_sums(key)
    if sums is None:
        return product(out_dtype=weight.dtype)
    into = sums.buffers.get(key)
    if into is None:
        sums.buffers[key] = product(out_dtype=torch.float32)
    else:
        product(accumulate_into=into)
    # the last micro-batch hands the sum over (the scope keeps no reference: autograd takes it
    # as the gradient without a copy)
    return sums.buffers.pop(key) if sums.last else None


def _rows_form(weight: torch.Tensor, owner: object | None, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight's per-row FP8 form: gathered by FSDP2 (`ExpertFp8Forms`), else quantized
    (once per reuse scope under `owner`/`name`, `kernels.fp8.quantized_weight`)."""
    if isinstance(weight, ExpertFp8Forms):
        # the values are views into the gathered buffer; the scales, small, are made contiguous
        return weight.rows_q, weight.rows_inv.contiguous()
    return quantized_weight(owner, name, master_data(weight), rowwise)


def _transposed_form(
    weight: torch.Tensor, owner: object | None, name: str, matrix_inv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight's transposed FP8 form (one scale per expert matrix, `matrix_inv`): gathered by
    FSDP2, else quantized like `_rows_form`."""
    if isinstance(weight, ExpertFp8Forms):
        return weight.t_q, weight.t_inv.contiguous()
    transposed = compiled("transposed", quantize_transposed, weight.device)
    return quantized_weight(owner, name, master_data(weight), lambda w: transposed(w, matrix_inv))


def _open_sums(key: tuple[int, str] | None):
    """The open `kernels.fp8.summed_weight_grads` scope for a weight with a `_sum_key`, else None
    (also while a compiler traces the backward: a traced graph would keep one micro-batch's
    decision for all; then FSDP2 sums the float32 gradients itself)."""
    if key is None or torch.compiler.is_compiling():
        return None
    return summed_weight_grads_scope()


def _sum_key(owner: object | None, weight: torch.Tensor, name: str) -> tuple[int, str] | None:
    """Where `kernels.fp8.summed_weight_grads` sums this weight's gradient: only weights FSDP2
    gathered as FP8 forms of float32 master weights (float32 gradients, `distributed.apply`) of
    an experts module (`owner`)."""
    gathered = isinstance(weight, ExpertFp8Forms) and weight.dtype == torch.float32
    return (id(owner), name) if owner is not None and gathered else None


def _no_rows_grad(like: torch.Tensor, shape, dtype, key: tuple[int, str] | None) -> torch.Tensor | None:
    """A weight's gradient from a micro-batch without rows: zeros, or under an open
    `kernels.fp8.summed_weight_grads` scope what `_fp8_weight_grad` would hand over (the sum of
    the earlier micro-batches at the last one, None before)."""
    return grad_without_rows(like, shape, dtype, _open_sums(key), key)


class _Fp8ExpertMLP(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x,
        up,
        down,
        offs,
        owner: object | None,
        fp8_wgrad: bool,
        mm: Callable[..., torch.Tensor],
        float32_wgrads: bool,
    ):
        ctx.no_rows = x.shape[0] == 0
        if ctx.no_rows:
            # an expert-parallel rank that received no rows: nothing to multiply (and no BF16
            # weights to fall back on when FSDP2 gathered FP8 forms); zero weight gradients
            # (or, summing over micro-batches, the sum of the earlier ones)
            ctx.weights = [
                (w.shape, w.dtype, _sum_key(owner, w, name))
                for w, name in ((up, "up_proj"), (down, "down_proj"))
            ]
            return x.new_zeros(0, down.shape[1])

        # rows the dispatcher already quantized (`train.fp8_dispatch`), else quantized here
        x_q, x_inv = fp8_rows_parts(x) or rowwise(x)
        # [E, ffn, hidden] per (e, ffn row)
        up_q, up_inv = _rows_form(up, owner, "up_proj.rows")
        h_pre = mm(x_q, x_inv, up_q, up_inv, offs)
        h_q, h_inv = rowwise(h_pre, relu2=True)
        # [E, hidden, ffn] per (e, hidden row)
        down_q, down_inv = _rows_form(down, owner, "down_proj.rows")
        out = mm(h_q, h_inv, down_q, down_inv, offs)
        # one inverse scale per expert matrix for the transposed copies: the largest of its rows'
        # FP8 weight gradients take x's per-row form (1 byte per element held, not BF16's 2)
        saved_x = (x_q, x_inv) if fp8_wgrad else (x,)
        ctx.save_for_backward(up, down, offs, h_pre, up_inv.amax(-1), down_inv.amax(-1), *saved_x)
        # the product (with a "triton" call's row tiles, made by the first product) for the backward
        ctx.mm, ctx.owner, ctx.fp8_wgrad, ctx.float32_wgrads = mm, owner, fp8_wgrad, float32_wgrads
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.no_rows:
            grads = [_no_rows_grad(grad_out, shape, dtype, key) for shape, dtype, key in ctx.weights]
            return grad_out.new_zeros(0, ctx.weights[0][0][-1]), *grads, None, None, None, None, None
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            # the forward ran with autocast off; a pipeline schedule runs the backward inside the
            # step's autocast, where the float32 reference products would be BF16 products
            return _Fp8ExpertMLP._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        up, down, offs, h_pre, up_matrix_inv, down_matrix_inv, *saved_x = ctx.saved_tensors
        dev = h_pre.device
        mm = ctx.mm

        given = fp8_rows_parts(grad_out)  # the combine wrote it quantized (`train.fp8_dispatch`)
        if given is not None and not ctx.fp8_wgrad:
            raise RuntimeError("fp8_expert_mlp: an FP8 output gradient needs FP8 weight gradients")
        if given is None:
            grad_out = grad_out.to(torch.bfloat16).contiguous()
        g_q, g_inv = given or rowwise(grad_out)
        # [E, ffn, hidden], one scale per expert
        down_t_q, down_t_inv = _transposed_form(down, ctx.owner, "down_proj.transposed", down_matrix_inv)
        grad_h = mm(g_q, g_inv, down_t_q, down_t_inv, offs)
        # each intermediate is dropped once its last product is queued (the caching allocator
        # reuses its memory for the next), not held to the end of the backward
        del down_t_q, down_t_inv
        if ctx.fp8_wgrad:
            x_q, x_inv = saved_x
            h_q, h_inv, dh_q, dh_inv = relu2_backward(h_pre, grad_h)
            del grad_h
            layout = expert_rows(offs, h_pre.shape[0])
            grad_down = _fp8_weight_grad(
                g_q,
                g_inv,
                h_q,
                h_inv,
                layout,
                down,
                _sum_key(ctx.owner, down, "down_proj"),
                ctx.float32_wgrads,
            )
            del g_q, g_inv, h_q, h_inv
        else:
            (x,) = saved_x
            h, dh_pre, dh_q, dh_inv = compiled("relu2_bwd", _relu2_backward_quantize, dev)(h_pre, grad_h)
            del grad_h, g_q, g_inv
            grad_down = _grouped_weight_grad(grad_out, h, offs, ctx.float32_wgrads)
            del h
        # [E, hidden, ffn], one scale per expert
        up_t_q, up_t_inv = _transposed_form(up, ctx.owner, "up_proj.transposed", up_matrix_inv)
        grad_x = mm(dh_q, dh_inv, up_t_q, up_t_inv, offs)
        del up_t_q, up_t_inv
        if ctx.fp8_wgrad:
            grad_up = _fp8_weight_grad(
                dh_q, dh_inv, x_q, x_inv, layout, up, _sum_key(ctx.owner, up, "up_proj"), ctx.float32_wgrads
            )
        else:
            grad_up = _grouped_weight_grad(dh_pre, x, offs, ctx.float32_wgrads)
        del dh_q, dh_inv
        grads = (
            grad_x.to(ctx.x_dtype),
            *(g if g is None else g.to(w.dtype) for g, w in ((grad_up, up), (grad_down, down))),
        )
        return *grads, None, None, None, None, None


def fp8_expert_mlp(
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    offs: torch.Tensor,
    emulate: bool = False,
    owner: object | None = None,
    fast_accum: bool = False,
    weight_grad: str = "bf16",
    grouped_gemm: str = "cutlass",
    grouped_tiles: Sequence[int] | None = None,
    float32_weight_grads: bool = False,
) -> torch.Tensor:
    """The experts' MLP (see the module docstring) on x [rows, hidden] sorted by expert, up
    [E, ffn, hidden], down [E, hidden, ffn], offs [E] int32 cumulative row counts. BF16 in and
    out; `emulate` computes the same roundings with float32 products (CPU, or no FP8 cores).
    `owner` (the experts module): the weights' quantized copies are reused under that key
    within a `kernels.fp8.reuse_quantized_weights` scope (None: quantized on every call).
    `fast_accum`: the four FP8 products accumulate in the tensor cores' own accumulator
    (`train.fp8.fast_accum`; contractions over the hidden and FFN widths). `weight_grad`
    (`train.fp8.experts_weight_grad`): "bf16" or "fp8" weight-gradient products. x may be an
    `Fp8Rows` (rows the dispatcher quantized, `train.fp8_dispatch`; "fp8" weight gradients only),
    and the output gradient may arrive as one: the same values either way. `grouped_gemm`
    (`train.fp8.experts_grouped_gemm`): the forward and input-gradient products by "cutlass"
    (`torch._scaled_grouped_mm`, CUDA) or "triton" (`kernels.fp8_grouped_triton` at
    `grouped_tiles`, `train.fp8.experts_grouped_tiles`; CUDA, or CPU under TRITON_INTERPRET=1);
    `emulate` overrides both. `float32_weight_grads` (`train.experts_float32_grads`): the
    weight-gradient products stored in float32 as they are summed; off, each rounded to BF16,
    what the BF16 experts' gradients hold (either way FSDP2 sums a step's micro-batches in
    float32). They reach the optimizer in float32 only where the weights are (FSDP2 gathered
    their FP8 forms, `train.fp8_gather`); a BF16 weight's gradient is BF16 whatever this says."""
    # the weights' FP8 forms come from their BF16 values (gathered forms already are)
    up, down = (w if isinstance(w, ExpertFp8Forms) else w.to(torch.bfloat16).contiguous() for w in (up, down))
    if weight_grad not in EXPERT_WEIGHT_GRADS:
        raise ValueError(
            f"fp8_expert_mlp: weight_grad {weight_grad!r} is not one of {list(EXPERT_WEIGHT_GRADS)}"
        )
    if grouped_gemm not in EXPERT_GROUPED_GEMMS:
        raise ValueError(
            f"fp8_expert_mlp: grouped_gemm {grouped_gemm!r} is not one of {list(EXPERT_GROUPED_GEMMS)}"
        )
    if grouped_tiles is not None:
        problem = grouped_tiles_problem(list(grouped_tiles))
        if problem:
            raise ValueError(f"fp8_expert_mlp: grouped_tiles {problem}")
    if isinstance(x, Fp8Rows):
        if weight_grad != "fp8":
            # BF16 weight gradients take the BF16 rows, which FP8 rows no longer hold
            raise ValueError("fp8_expert_mlp: rows in FP8 form (Fp8Rows) need weight_grad='fp8'")
    else:
        x = x.to(torch.bfloat16).contiguous()
    tiles = tuple(grouped_tiles) if grouped_tiles is not None else None
    mm = _grouped_product(emulate, grouped_gemm, tiles, fast_accum)
    return _Fp8ExpertMLP.apply(x, up, down, offs, owner, weight_grad == "fp8", mm, float32_weight_grads)
