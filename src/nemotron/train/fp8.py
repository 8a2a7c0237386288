"""FP8 training (`train.fp8`): the model's GEMMs on Hopper's FP8 tensor cores, master weights
unchanged.

Applied from outside the model, before sharding, by swapping modules (no method is replaced):

- dense linears (Mamba-2 in/out projections, attention q/k/v/o, the MoE shared expert, dense
  MLPs) become torchao's `Float8Linear` (`torchao.float8.convert_to_float8_training`), a
  subclass of `nn.Linear` with the same `weight` parameter. Each forward casts its input and
  weight to float8 e4m3 with dynamic scales (`recipe`: one scale per tensor, or one per row),
  runs the FP8 GEMM (`torch._scaled_mm`), and backward does the same for the output gradient.
  On CUDA each converted linear is compiled (`nn.Module.compile`) so that the amax, scale and
  cast ops fuse into a few kernels (eager, each is its own elementwise pass over the tensor;
  torchao's documentation recommends compiling).
- routed experts become `Float8GroupedExperts`, a subclass of the model's `GroupedExperts`
  holding the same `up_proj` / `down_proj` parameters, whose forward runs torchao's FP8
  grouped GEMM (rowwise scales; `torch._scaled_grouped_mm`) for the forward, input-gradient
  and weight-gradient products. That GEMM needs every expert's row group to start at a
  multiple of 16 rows, so the rows are padded per expert (zeros) around the expert MLP.

The router, norms, embeddings, LM head, convolution and the SSD scan keep their precision.
Parameter names and values are those of the BF16 model, so checkpoints are interchangeable
between FP8 and BF16 runs and `export hf` is unchanged. Off CUDA (and on GPUs without FP8
tensor cores) the same modules compute in emulation: operands rounded to float8 with the same
scales, products in float32 (what the CPU tests check).

torchao is an optional dependency (`pip install 'nemotron[fp8]'`); `apply_fp8` raises
`Fp8Unavailable` naming the key when it is missing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

import torch
from torch import nn

from nemotron.kernels.relu2 import relu2
from nemotron.models.nano3.moe import GroupedExperts, local_experts
from nemotron.train.fp8_config import DEFAULT_FP8_LAYERS, FP8_LAYERS, RECIPES, Fp8Config, check_fp8_config  # noqa: F401  (re-exported: one import for users)

MIN_TORCHAO = (0, 18)
# torch._scaled_mm / _scaled_grouped_mm: both GEMM dimensions of an operand multiples of 16;
# the grouped GEMM also needs each expert's row group aligned to 16 rows.
FP8_ALIGN = 16
FLOAT8 = torch.float8_e4m3fn


class Fp8Unavailable(RuntimeError):
    """train.fp8 is on but torchao (>= 0.18) is not installed."""


@dataclass
class Fp8Summary:
    """What `apply_fp8` converted (module names as in `model.named_modules()`)."""

    linears: list[str]
    experts: list[str]
    skipped: list[str]  # selected but not convertible (a dimension not a multiple of 16)
    emulated: bool

    def describe(self) -> str:
        mode = "emulated (no FP8 tensor cores)" if self.emulated else "FP8 tensor cores"
        text = f"fp8: {len(self.linears)} linears, {len(self.experts)} expert groups, {mode}"
        if self.skipped:
            text += f"; not converted (dims not multiples of {FP8_ALIGN}): {', '.join(self.skipped)}"
        return text


# ---------------------------------------------------------------------------------------------
# Availability and validation


def torchao_version() -> tuple[int, ...] | None:
    """torchao's (major, minor) if installed, else None (not imported: importing it is slow)."""
    if importlib.util.find_spec("torchao") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("torchao")
    except PackageNotFoundError:
        return None
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def torchao_available() -> bool:
    found = torchao_version()
    return found is not None and found >= MIN_TORCHAO


def require_torchao() -> None:
    found = torchao_version()
    if found is None or found < MIN_TORCHAO:
        have = "is not installed" if found is None else f"is {'.'.join(map(str, found))}"
        raise Fp8Unavailable(
            f"train.fp8.enabled=true needs torchao >= {'.'.join(map(str, MIN_TORCHAO))}, which "
            f"{have}: pip install 'nemotron[fp8]' (or set train.fp8.enabled=false)"
        )


def fp8_hardware(device: torch.device) -> bool:
    """True on CUDA devices with FP8 tensor cores (compute capability 8.9 or newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


# ---------------------------------------------------------------------------------------------
# Applying it to a model


def _selected_modules(model: nn.Module, layers: list[str]) -> tuple[dict[int, str], dict[str, nn.Module]]:
    """(id -> name of the nn.Linear modules to convert, name -> MoE module whose experts to
    swap) for the chosen layer kinds, found through the blocks' kinds."""
    from nemotron.models.nano3.model import Block

    wanted = set(layers)
    linears: dict[int, str] = {}
    moes: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not isinstance(module, Block):
            continue
        mixer = module.mixer
        prefix = f"{name}.mixer" if name else "mixer"
        if module.kind == "mamba" and "mamba" in wanted:
            picks = {"in_proj": mixer.in_proj, "out_proj": mixer.out_proj}
        elif module.kind == "attention" and "attention" in wanted:
            picks = {p: getattr(mixer, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        elif module.kind == "mlp" and "mlp" in wanted:
            picks = {"up_proj": mixer.up_proj, "down_proj": mixer.down_proj}
        elif module.kind == "moe":
            picks = {}
            if "shared_expert" in wanted and mixer.shared_experts is not None:
                picks = {
                    f"shared_experts.{p}": getattr(mixer.shared_experts, p) for p in ("up_proj", "down_proj")
                }
            if "experts" in wanted:
                moes[prefix] = mixer
        else:
            picks = {}
        for sub, linear in picks.items():
            linears[id(linear)] = f"{prefix}.{sub}"
    return linears, moes


def _aligned(linear: nn.Linear) -> bool:
    return linear.in_features % FP8_ALIGN == 0 and linear.out_features % FP8_ALIGN == 0


def float8_linear_config(fp8: Fp8Config, emulate: bool):
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(fp8.recipe)
    return dataclasses.replace(
        config, emulate=emulate, enable_fsdp_float8_all_gather=fp8.fsdp_float8_all_gather
    )


def apply_fp8(model: nn.Module, fp8: Fp8Config, device: torch.device) -> Fp8Summary:
    """Swap the layers `fp8.layers` of `model` (a `Nano3ForCausalLM` or a `Block`, on any device
    including meta, before FSDP2/EP sharding) for their FP8 versions, in place. Emulated unless
    `device` has FP8 tensor cores; compiled per `fp8.compile` on CUDA."""
    require_torchao()
    from torchao.float8 import convert_to_float8_training

    emulate = not fp8_hardware(device)
    chosen, moes = _selected_modules(model, fp8.layers)
    by_id = {id(m): m for m in model.modules() if isinstance(m, nn.Linear)}  # what `chosen` names
    skipped = sorted(name for i, name in chosen.items() if not _aligned(by_id[i]))
    convert = {i for i in chosen if _aligned(by_id[i])}
    if convert:
        convert_to_float8_training(
            model,
            config=float8_linear_config(fp8, emulate),
            module_filter_fn=lambda module, fqn: id(module) in convert,
        )
    from torchao.float8.float8_linear import Float8Linear

    linears = [name for name, m in model.named_modules() if isinstance(m, Float8Linear)]
    if fp8.compile and not emulate and linears:
        # One compiled forward per distinct linear shape and module; dynamo's default limit of
        # 8 recompiles per code object would send the rest back to eager.
        import torch._dynamo

        limit = max(64, 2 * len(linears))
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        for name in linears:
            model.get_submodule(name).compile(dynamic=False)
    experts = []
    for name, moe in moes.items():
        if not isinstance(moe.experts, Float8GroupedExperts):
            # before EP sharding, the experts are still the model's own
            assert isinstance(moe.experts, GroupedExperts), f"{name}.experts: {type(moe.experts)}"
            moe.experts = Float8GroupedExperts(moe.experts, emulate=emulate)
        experts.append(f"{name}.experts")
    return Fp8Summary(linears=linears, experts=experts, skipped=skipped, emulated=emulate)


# ---------------------------------------------------------------------------------------------
# Routed experts


class Float8GroupedExperts(GroupedExperts):
    """The routed experts' squared-ReLU MLPs with FP8 grouped GEMMs; the same parameters
    (`up_proj` [E, ffn, hidden], `down_proj` [E, hidden, ffn]) as the `GroupedExperts` it is
    made from, which it shares (no copy)."""

    def __init__(self, experts: GroupedExperts, emulate: bool = False) -> None:
        nn.Module.__init__(self)
        self.init_std = experts.init_std
        self.output_init_std = experts.output_init_std
        self.up_proj = experts.up_proj
        self.down_proj = experts.down_proj
        self.emulate = emulate

    def extra_repr(self) -> str:
        return f"fp8 rowwise{', emulated' if self.emulate else ''}"

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [rows, hidden] sorted by expert, counts [E] rows per expert -> [rows, hidden]."""
        up, down = local_experts(self.up_proj), local_experts(self.down_proj)
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, up, down = x.to(dtype), up.to(dtype), down.to(dtype)
        if not all(d % FP8_ALIGN == 0 for d in up.shape[1:]):
            return super().forward(x, counts)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.emulate or not x.is_cuda:
                offs = torch.cumsum(counts, 0)
                h = relu2(emulated_fp8_grouped_mm(x, up.transpose(-2, -1), offs))
                return emulated_fp8_grouped_mm(h, down.transpose(-2, -1), offs)
            from torchao.prototype.moe_training.fp8_grouped_mm import (
                _to_fp8_rowwise_then_scaled_grouped_mm as fp8_grouped_mm,
            )

            dest, padded_ends, capacity = aligned_group_rows(counts, x.shape[0], FP8_ALIGN)
            xp = _ScatterRows.apply(x, dest, capacity)
            h = relu2(
                fp8_grouped_mm(
                    xp, up.transpose(-2, -1), padded_ends, x.dtype, pad_token_groups_for_grouped_mm=False
                )
            )
            out = fp8_grouped_mm(
                h, down.transpose(-2, -1), padded_ends, x.dtype, pad_token_groups_for_grouped_mm=False
            )
            return _GatherRows.apply(out, dest)


def aligned_group_rows(counts: torch.Tensor, rows: int, align: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where each row of an expert-sorted [rows, ...] tensor goes when every expert's group is
    padded to a multiple of `align` rows: (dest [rows] int64, padded group ends [E] int32,
    capacity). Static shapes, no host synchronisation: capacity is the most any routing can
    need (rows + E * (align - 1), rounded up); rows past the last group end are never read."""
    num_experts = counts.numel()
    ends = torch.cumsum(counts, 0)
    padded = (counts + (align - 1)) // align * align
    padded_ends = torch.cumsum(padded, 0)
    shift = (padded_ends - padded) - (ends - counts)  # group start moves by this much
    index = torch.arange(rows, device=counts.device)
    expert = torch.searchsorted(ends, index, right=True).clamp_(max=num_experts - 1)
    capacity = -(-(rows + num_experts * (align - 1)) // align) * align
    return index + shift[expert], padded_ends.to(torch.int32), capacity


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """A contiguous [rows, cols] tensor viewed as 8-byte words per row where the row allows it:
    PyTorch's row copies (`index_copy_`) run element by element, so 2-byte elements cost 4x
    the work of the same bytes as int64 (measured on an H200: index_copy_ of [148K, 2688]
    bf16 rows took 1.2 ms, ~1/3 of copy bandwidth)."""
    t = t.contiguous()
    if t.dim() == 2 and (t.shape[1] * t.element_size()) % 8 == 0 and t.element_size() < 8:
        return t.view(torch.int64)
    return t


def _scatter_rows(x: torch.Tensor, dest: torch.Tensor, rows: int) -> torch.Tensor:
    """zeros [rows, cols] with out[dest] = x."""
    out = x.new_zeros(rows, x.shape[1])
    _as_words(out).index_copy_(0, dest, _as_words(x))
    return out


def _gather_rows(x: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    return _as_words(x).index_select(0, dest).view(x.dtype)


class _ScatterRows(torch.autograd.Function):
    """out = zeros [capacity, cols]; out[dest] = x. Backward gathers the rows back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dest: torch.Tensor, capacity: int) -> torch.Tensor:
        ctx.save_for_backward(dest)
        return _scatter_rows(x, dest, capacity)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (dest,) = ctx.saved_tensors
        return _gather_rows(grad, dest), None, None


class _GatherRows(torch.autograd.Function):
    """out = x[dest]. Backward writes the gradient rows back into zeros (the padding rows'
    gradient is zero, which the weight-gradient GEMM relies on)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(dest)
        ctx.rows = x.shape[0]
        return _gather_rows(x, dest)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (dest,) = ctx.saved_tensors
        return _scatter_rows(grad, dest, ctx.rows), None


# ---------------------------------------------------------------------------------------------
# Emulation (and the reference the GPU path is tested against)


def float8_round(x: torch.Tensor, dim: int | tuple[int, ...] | None) -> torch.Tensor:
    """x rounded to float8 e4m3 with torchao's dynamic scaling, returned in float32: the scale
    is `448 / amax` over `dim` (None: the whole tensor), rounded down to a power of two, the
    scaled values saturate at +-448."""
    xf = x.float()
    amax = xf.abs().amax() if dim is None else xf.abs().amax(dim=dim, keepdim=True)
    fmax = torch.finfo(FLOAT8).max
    scale = torch.exp2(torch.floor(torch.log2(fmax / amax.clamp(min=1e-12))))
    return (xf * scale).clamp(-fmax, fmax).to(FLOAT8).float() / scale


class _EmulatedFp8GroupedMM(torch.autograd.Function):
    """out[group rows] = A[group rows] @ B_t[group] with torchao's rowwise FP8 grouped GEMM's
    roundings: forward A per row and B_t per output column (over K); input gradient: the
    output gradient per row and B per input column (over N); weight gradient: the output
    gradient and A per column over each group's rows. Products in float32."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b_t: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b_t, ends)
        aq, bq = float8_round(a, -1), float8_round(b_t, -2)
        out = torch.zeros(a.shape[0], b_t.shape[-1], dtype=torch.float32, device=a.device)
        for e, (lo, hi) in enumerate(_groups(ends)):
            out[lo:hi] = aq[lo:hi] @ bq[e]
        return out.to(a.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b_t, ends = ctx.saved_tensors
        gq, bq = float8_round(grad, -1), float8_round(b_t, -1)
        grad_a = torch.zeros(a.shape, dtype=torch.float32, device=a.device)
        grad_b = torch.zeros(b_t.shape, dtype=torch.float32, device=a.device)
        for e, (lo, hi) in enumerate(_groups(ends)):
            grad_a[lo:hi] = gq[lo:hi] @ bq[e].transpose(0, 1)
            if hi > lo:
                grad_b[e] = float8_round(a[lo:hi], 0).transpose(0, 1) @ float8_round(grad[lo:hi], 0)
        return grad_a.to(a.dtype), grad_b.to(b_t.dtype), None


def _groups(ends: torch.Tensor) -> list[tuple[int, int]]:
    bounds = [0] + ends.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def emulated_fp8_grouped_mm(a: torch.Tensor, b_t: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """a [rows, K] (rows sorted by group), b_t [E, K, N], ends [E] cumulative row counts ->
    [rows, N], with FP8 rowwise roundings (see `_EmulatedFp8GroupedMM`)."""
    return _EmulatedFp8GroupedMM.apply(a, b_t, ends)
