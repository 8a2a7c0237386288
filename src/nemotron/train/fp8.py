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
  torchao's documentation recommends compiling); `autotune_casts` has Inductor tune those
  kernels' launch configurations (`CAST_TUNING`).
- routed experts become `Float8GroupedExperts`, a subclass of the model's `GroupedExperts`
  holding the same `up_proj` / `down_proj` parameters, whose forward runs
  `nemotron.train.fp8_grouped.fp8_expert_mlp`: FP8 grouped GEMMs (`torch._scaled_grouped_mm`,
  or with `experts_grouped_gemm=triton` `kernels.fp8_grouped_triton` at `experts_grouped_tiles`;
  rowwise scales) for the forward and input-gradient products, BF16 grouped GEMMs for the
  weight gradients (or, `experts_weight_grad=fp8`, FP8 ones: `nemotron.kernels.fp8_wgrad`),
  each rounded to BF16 as the BF16 experts' are, or kept in float32 with
  `train.experts_float32_grads` as theirs are then (one key for both precisions), quantization fused into the squared ReLU (see that module for why this and
  not torchao's FP8 grouped GEMM). With `experts_fsdp_float8_all_gather` their weights become
  `fp8_gather.ExpertMasterWeight`s, which FSDP2 gathers as the two FP8 forms the products take
  (made once per unshard instead of once per call). With FP8 weight gradients the MoE's
  single-device dispatcher becomes `fp8_dispatch.Fp8LocalDispatcher`, which moves the experts'
  rows and output gradient in per-row FP8 form (same values; expert parallelism keeps its own).

- the LM head (opt-in, `lm_head`): the chunked LM-head loss runs its three products (logits,
  hidden gradient, weight gradient) on FP8 operands (`linear_cross_entropy(fp8=True)`, one
  scale per tensor; the logit gradient in e4m3 and, transposed, e5m2, written by the pass
  that computes it).

The router, norms, embeddings, convolution and the SSD scan keep their precision. With
`fast_accum` (the default) every FP8 product except the LM head's hidden gradient accumulates
in the tensor cores' own accumulator (`nemotron.kernels.fp8`, above `tensorwise_mm`).

Under tensor parallelism (`apply_fp8(..., tensor_parallel=TP)`, tensorwise recipe only) the
converted linears in the DTensor plans are sharded with torchao's float8 styles
(`distributed/tensor_parallel.py`); the layers whose TP layout has no FP8 form are left in
higher precision and listed in `Fp8Summary.skipped` with the reason (`tp_fp8_exclusions`, the
one home of that rule): the Mamba-2 `in_proj` (rank-local: each rank multiplies by its own rows
of the packed weight), k/v when there are fewer KV heads than TP ranks (`KeepKVHead` replicates
them) and the LM head (the vocabulary-parallel loss has no FP8 products).
Parameter names and values are those of the BF16 model, so checkpoints are interchangeable
between FP8 and BF16 runs and `export hf` is unchanged. Off CUDA (and on GPUs without FP8
tensor cores) the same modules compute in emulation: operands rounded to float8 with the same
scales, products in float32 (what the CPU tests check).

torchao is an optional dependency (`pip install 'nemotron[fp8]'`) needed for the dense
linears; `apply_fp8` raises `Fp8Unavailable` naming the key when they are selected and it is
missing (the routed experts need only PyTorch).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

import torch
from torch import nn

from nemotron.kernels.fp8 import FLOAT8, FP8_ALIGN, fp8_hardware  # noqa: F401  (re-exported)
from nemotron.models.nano3.moe import GroupedExperts, LocalDispatcher, local_experts
from nemotron.train.fp8_config import (  # noqa: F401  (re-exported: one import for users)
    DEFAULT_FP8_LAYERS,
    FP8_LAYERS,
    RECIPES,
    Fp8Config,
    check_fp8_config,
    tp_recipe_message,
)
from nemotron.train.fp8_dispatch import Fp8LocalDispatcher
from nemotron.train.fp8_gather import ExpertFp8Forms, ExpertMasterWeight
from nemotron.train.fp8_grouped import fp8_expert_mlp, grouped_product_runs

MIN_TORCHAO = (0, 18)
# `train.fp8.autotune_casts`: Inductor options for the compiled linears (their cast and amax
# kernels are memory-bound Triton kernels whose default block sizes are a heuristic's)
CAST_TUNING = {"max_autotune_pointwise": True, "coordinate_descent_tuning": True}


class Fp8Unavailable(RuntimeError):
    """train.fp8 is on but torchao (>= 0.18) is not installed."""


@dataclass
class Fp8Summary:
    """What `apply_fp8` converted (module names as in `model.named_modules()`)."""

    linears: list[str]
    experts: list[str]
    skipped: dict[str, str]  # selected but left in higher precision: name -> why
    emulated: bool
    lm_head: bool = False
    # MoE layers whose dispatcher moves the experts' rows in FP8 (`fp8_dispatch`)
    fp8_dispatch: list[str] = dataclasses.field(default_factory=list)

    @classmethod
    def merge(cls, parts: list[Fp8Summary]) -> Fp8Summary:
        """One summary of a model converted in parts (pipeline stages, in stage order)."""
        return cls(
            linears=[name for part in parts for name in part.linears],
            experts=[name for part in parts for name in part.experts],
            skipped={name: why for part in parts for name, why in part.skipped.items()},
            emulated=any(part.emulated for part in parts),
            lm_head=any(part.lm_head for part in parts),
            fp8_dispatch=[name for part in parts for name in part.fp8_dispatch],
        )

    def describe(self) -> str:
        mode = "emulated (no FP8 tensor cores)" if self.emulated else "FP8 tensor cores"
        head = ", LM head" if self.lm_head else ""
        rows = f" ({len(self.fp8_dispatch)} with FP8 dispatch)" if self.fp8_dispatch else ""
        text = f"fp8: {len(self.linears)} linears, {len(self.experts)} expert groups{rows}{head}, {mode}"
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.skipped.items():
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            text += f"; not converted ({reason}): {', '.join(names)}"
        return text


NOT_ALIGNED = f"dims not multiples of {FP8_ALIGN}"


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
    try:
        import torchao.float8  # noqa: F401
    except Exception as e:  # e.g. built for another torch: its import fails, not its version
        raise Fp8Unavailable(
            f"train.fp8.enabled=true needs torchao's float8 training, but torchao "
            f"{'.'.join(map(str, found))} is installed and cannot be imported "
            f"({type(e).__name__}: {e}): reinstall it for this torch (pip install "
            "'nemotron[fp8]') or set train.fp8.enabled=false"
        ) from None


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


def tp_fp8_exclusions(model: nn.Module, tensor_parallel: int) -> dict[str, str]:
    """The layers of `model` that stay in higher precision under tensor parallelism of size
    `tensor_parallel` (name -> why), whatever `train.fp8.layers` selects: those whose TP layout
    (`distributed/tensor_parallel.py`) has no FP8 form. Empty without TP."""
    if tensor_parallel <= 1:
        return {}
    from nemotron.distributed.tensor_parallel import replicates_kv
    from nemotron.models.nano3.attention import Attention
    from nemotron.models.nano3.model import Block, Nano3ForCausalLM

    out: dict[str, str] = {}
    for name, module in model.named_modules():
        prefix = f"{name}.mixer" if name else "mixer"
        if isinstance(module, Block) and module.kind == "mamba":
            # the mixer multiplies by this rank's rows of the packed z|x|B|C|dt weight
            # (`F.linear`), which would bypass a Float8Linear's forward
            out[f"{prefix}.in_proj"] = "rank-local under tensor parallelism"
        elif isinstance(module, Block) and module.kind == "attention":
            mixer = module.mixer
            assert isinstance(mixer, Attention)
            if replicates_kv(mixer.num_kv_heads, tensor_parallel):
                reason = "replicated under tensor parallelism with fewer KV heads than TP ranks"
                out[f"{prefix}.k_proj"] = out[f"{prefix}.v_proj"] = reason
    if isinstance(model, Nano3ForCausalLM) and model.lm_head is not None:
        out["lm_head"] = "the vocabulary-parallel loss of tensor parallelism has no FP8 products"
    return out


def _aligned(linear: nn.Linear, tensor_parallel: int = 1) -> bool:
    """Whether the FP8 GEMMs can take `linear`'s dimensions; under TP, those of each rank's
    shard (one of the two dimensions is split over the ranks: both are asked to divide)."""
    align = FP8_ALIGN * tensor_parallel
    return linear.in_features % align == 0 and linear.out_features % align == 0


def _experts_aligned(experts: GroupedExperts) -> bool:
    """Whether the routed experts' FP8 grouped products can take their dimensions (hidden and
    FFN widths; the expert dimension, which expert parallelism splits, does not matter)."""
    return all(d % FP8_ALIGN == 0 for d in experts.up_proj.shape[1:])


def _not_aligned(tensor_parallel: int) -> str:
    return NOT_ALIGNED if tensor_parallel <= 1 else f"{NOT_ALIGNED} x TP={tensor_parallel} (per-rank shards)"


def float8_linear_config(fp8: Fp8Config, emulate: bool):
    """torchao's config for the dense linears: `fp8.recipe`'s casts, and all three products
    (output, input gradient, weight gradient) with `fp8.fast_accum`'s accumulation (torchao's
    recipes use the fast one for the output only)."""
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.config import Float8GemmConfig

    config = Float8LinearConfig.from_recipe_name(fp8.recipe)
    gemm = Float8GemmConfig(use_fast_accum=fp8.fast_accum)
    return dataclasses.replace(
        config,
        emulate=emulate,
        enable_fsdp_float8_all_gather=fp8.fsdp_float8_all_gather,
        gemm_config_output=gemm,
        gemm_config_grad_input=gemm,
        gemm_config_grad_weight=gemm,
    )


def apply_fp8(
    model: nn.Module,
    fp8: Fp8Config,
    device: torch.device,
    tensor_parallel: int = 1,
    experts_float32_grads: bool = False,
) -> Fp8Summary:
    """Swap the layers `fp8.layers` of `model` (a `Nano3ForCausalLM` or a `Block`, on any device
    including meta, before FSDP2/EP/TP sharding) for their FP8 versions, in place. Emulated
    unless `device` has FP8 tensor cores; compiled per `fp8.compile` on CUDA. `tensor_parallel`:
    the TP size the model will be sharded over (`tp_fp8_exclusions` stay in higher precision;
    TP needs the tensorwise recipe). `experts_float32_grads` (`train.experts_float32_grads`): the
    FP8 routed experts' weight-gradient products kept in float32 instead of rounded to BF16 (as
    the BF16 experts' are with the key; `Float8GroupedExperts`). A `fp8` that `check_fp8_config` refuses raises ValueError
    naming the keys (library callers, e.g. the benchmarks, skip the recipe's load-time checks:
    a misspelt layer kind would otherwise convert nothing, silently)."""
    # precision is the caller's (the layers left out compute in it); everything else is checked
    problems = check_fp8_config(dataclasses.replace(fp8, enabled=True), "bf16", tensor_parallel)
    if problems:
        raise ValueError("; ".join(f"{key}: {message}" for key, message in problems))
    if tensor_parallel > 1 and fp8.recipe != "tensorwise":
        raise ValueError(tp_recipe_message(fp8.recipe, tensor_parallel))
    emulate = not fp8_hardware(device)
    chosen, moes = _selected_modules(model, fp8.layers)
    if moes and not emulate:
        _check_grouped_product(fp8, device)
    excluded = tp_fp8_exclusions(model, tensor_parallel)
    by_id = {id(m): m for m in model.modules() if isinstance(m, nn.Linear)}  # what `chosen` names
    skipped: dict[str, str] = {}
    for i, name in sorted(chosen.items(), key=lambda item: item[1]):
        if name in excluded:
            skipped[name] = excluded[name]
        elif not _aligned(by_id[i], tensor_parallel):
            skipped[name] = _not_aligned(tensor_parallel)
    convert = {i for i, name in chosen.items() if name not in skipped}
    linears: list[str] = []
    if convert:
        require_torchao()  # the dense linears are torchao's; the routed experts need only torch
        from torchao.float8 import convert_to_float8_training
        from torchao.float8.float8_linear import Float8Linear

        convert_to_float8_training(
            model,
            config=float8_linear_config(fp8, emulate),
            module_filter_fn=lambda module, fqn: id(module) in convert,
        )
        linears = [name for name, m in model.named_modules() if isinstance(m, Float8Linear)]
    if fp8.compile and not emulate and linears:
        # One compiled forward per distinct linear shape and module; dynamo's default limit of
        # 8 recompiles per code object would send the rest back to eager.
        import torch._dynamo

        limit = max(64, 2 * len(linears))
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        options = CAST_TUNING if fp8.autotune_casts else None
        for name in linears:
            model.get_submodule(name).compile(dynamic=False, options=options)
    experts: list[str] = []
    fp8_dispatch: list[str] = []
    for name, moe in moes.items():
        # before EP sharding, the experts are still the model's own (or already converted)
        assert isinstance(moe.experts, GroupedExperts), f"{name}.experts: {type(moe.experts)}"
        if not _experts_aligned(moe.experts):
            # their FP8 products could not take these dimensions: they would compute in BF16
            # while counted as FP8 experts; left as they are and listed, like such linears
            skipped[f"{name}.experts"] = NOT_ALIGNED
            continue
        if not isinstance(moe.experts, Float8GroupedExperts):
            moe.experts = Float8GroupedExperts(
                moe.experts,
                # without FP8 tensor cores emulated, unless the chosen product runs anyway
                # (the Triton one in the interpreter, on CPU: how the CPU tests run it)
                emulate=not grouped_product_runs(fp8.experts_grouped_gemm, device),
                fast_accum=fp8.fast_accum,
                weight_grad=fp8.experts_weight_grad,
                grouped_gemm=fp8.experts_grouped_gemm,
                grouped_tiles=fp8.experts_grouped_tiles,
                float32_weight_grads=experts_float32_grads,
            )
        if fp8.experts_fsdp_float8_all_gather:
            gathered = moe.experts.gather_fp8_forms()
            assert gathered, name  # aligned: checked above
        experts.append(f"{name}.experts")
        if (
            fp8.experts_weight_grad == "fp8"
            and type(moe.dispatcher) is LocalDispatcher
            and moe.experts.takes_fp8_rows()
        ):
            # the experts need their rows only in FP8: moved that way (bit-identical results)
            moe.dispatcher = Fp8LocalDispatcher(moe.dispatcher.num_experts)
            fp8_dispatch.append(name)
    lm_head = False
    if "lm_head" in fp8.layers:
        from nemotron.models.nano3.model import Nano3ForCausalLM

        if isinstance(model, Nano3ForCausalLM) and model.lm_head is not None:
            head = model.lm_head
            if "lm_head" in excluded:
                skipped["lm_head"] = excluded["lm_head"]
            elif not model.fused_loss:
                skipped["lm_head"] = "only the chunked loss (train.fused_kernels) has FP8 products"
            elif not _aligned(head):
                skipped["lm_head"] = NOT_ALIGNED
            else:
                model.fp8_lm_head = lm_head = True
                model.fp8_lm_head_group_rows = fp8.lm_head_group_rows
                model.fp8_lm_head_fast_accum = fp8.fast_accum
        # (a pipeline part without the head has nothing to convert)
    return Fp8Summary(
        linears=linears,
        experts=experts,
        skipped=skipped,
        emulated=emulate,
        lm_head=lm_head,
        fp8_dispatch=fp8_dispatch,
    )


# Compute capabilities on which PyTorch offers `torch._scaled_grouped_mm` (its own check: "only
# supported on CUDA devices with compute capability = [9.0, 10.0]"): a set, not a floor (sm_89
# and sm_120 have FP8 tensor cores but not this kernel).
SCALED_GROUPED_MM_CAPABILITIES = ((9, 0), (10, 0))


def _check_grouped_product(fp8: Fp8Config, device: torch.device) -> None:
    """What the routed experts' FP8 product (`experts_grouped_gemm`) needs of the GPU, which
    the config check cannot see, so that a run is refused here, naming the key, instead of
    failing in its first step: "cutlass" a GPU PyTorch's `_scaled_grouped_mm` runs on;
    "triton" Triton, and with `use_tma` (the kernel's default tiles have it) the Tensor Memory
    Accelerator of sm_90+ (an sm_89 GPU has FP8 tensor cores but no TMA)."""
    capability = torch.cuda.get_device_capability(device)
    if fp8.experts_grouped_gemm == "cutlass":
        if capability not in SCALED_GROUPED_MM_CAPABILITIES:
            raise ValueError(
                f"train.fp8.experts_grouped_gemm: 'cutlass' runs torch._scaled_grouped_mm, which PyTorch "
                f"offers on compute capability 9.0 and 10.0 only, and {device} is sm_{capability[0]}"
                f"{capability[1]}: use 'triton' (with use_tma 0 tiles below sm_90) or leave 'experts' "
                "out of train.fp8.layers"
            )
        return
    from nemotron.kernels import triton_available

    if not triton_available():
        raise ValueError(
            "train.fp8.experts_grouped_gemm: 'triton' runs a Triton kernel, and Triton is not "
            "installed (pip install triton), or use 'cutlass'"
        )
    from nemotron.kernels.fp8_grouped_triton import DEFAULT_CONFIG

    tiles = fp8.experts_grouped_tiles if fp8.experts_grouped_tiles is not None else list(DEFAULT_CONFIG)
    if tiles[5] and capability < (9, 0):
        given = "" if fp8.experts_grouped_tiles is not None else " (the default tiles')"
        raise ValueError(
            f"train.fp8.experts_grouped_tiles: use_tma=1{given} needs the Tensor Memory Accelerator "
            f"of sm_90 or newer, and {device} is sm_{capability[0]}{capability[1]}: give tiles with use_tma 0"
        )


# ---------------------------------------------------------------------------------------------
# Routed experts


class Float8GroupedExperts(GroupedExperts):
    """The routed experts' squared-ReLU MLPs with FP8 grouped GEMMs
    (`nemotron.train.fp8_grouped.fp8_expert_mlp`: forward and input-gradient products in FP8
    with rowwise scales, weight gradients in BF16 or, `weight_grad="fp8"`, FP8 with one scale per
    expert; each weight-gradient product rounded to BF16 unless `float32_weight_grads`,
    `train.experts_float32_grads`); the same parameters (`up_proj`
    [E, ffn, hidden], `down_proj` [E, hidden, ffn]) as the `GroupedExperts` it is made from,
    which it shares (no copy)."""

    def __init__(
        self,
        experts: GroupedExperts,
        emulate: bool = False,
        fast_accum: bool = False,
        weight_grad: str = "bf16",
        grouped_gemm: str = "cutlass",
        grouped_tiles: list[int] | None = None,
        float32_weight_grads: bool = False,
    ) -> None:
        nn.Module.__init__(self)
        self.init_std = experts.init_std
        self.output_init_std = experts.output_init_std
        self.up_proj = experts.up_proj
        self.down_proj = experts.down_proj
        self.emulate = emulate
        self.fast_accum = fast_accum
        self.weight_grad = weight_grad
        self.grouped_gemm = grouped_gemm
        self.grouped_tiles = None if grouped_tiles is None else list(grouped_tiles)
        self.float32_weight_grads = float32_weight_grads

    def extra_repr(self) -> str:
        gathered = isinstance(local_experts(self.up_proj), (ExpertMasterWeight, ExpertFp8Forms))
        return (
            f"fp8 rowwise, {self.grouped_gemm} products"
            f"{f' {self.grouped_tiles}' if self.grouped_tiles is not None else ''}, {self.weight_grad} weight "
            f"gradients{' in float32' if self.float32_weight_grads else ''}"
            f"{', fast accumulation' if self.fast_accum else ''}"
            f"{', FP8 forms gathered by FSDP2' if gathered else ''}{', emulated' if self.emulate else ''}"
        )

    def gather_fp8_forms(self) -> bool:
        """Make the weights `ExpertMasterWeight`s (before sharding): FSDP2 then gathers their FP8
        forms instead of BF16 copies (`nemotron.train.fp8_gather`). False (nothing changed)
        when their dimensions are not ones the FP8 products take."""
        if not all(d % FP8_ALIGN == 0 for d in self.up_proj.shape[1:]):
            return False
        for name in ("up_proj", "down_proj"):
            param = getattr(self, name)
            if not isinstance(param, ExpertMasterWeight):
                wrapped = nn.Parameter(ExpertMasterWeight(param.detach()), requires_grad=param.requires_grad)
                setattr(self, name, wrapped)
        return True

    def takes_fp8_rows(self) -> bool:
        """Whether rows may come in per-row FP8 form (`fp8_dispatch`): FP8 weight gradients
        and dimensions the FP8 products take (else the BF16 path would need BF16 rows)."""
        return self.weight_grad == "fp8" and all(d % FP8_ALIGN == 0 for d in self.up_proj.shape[1:])

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [rows, hidden] sorted by expert (an `Fp8Rows` from `Fp8LocalDispatcher` when
        `takes_fp8_rows`), counts [E] rows per expert -> [rows, hidden]."""
        up, down = local_experts(self.up_proj), local_experts(self.down_proj)
        gathered = isinstance(up, ExpertFp8Forms)  # FSDP2 gathered FP8 forms: no BF16 weights
        if (x.shape[0] == 0 and not gathered) or not all(d % FP8_ALIGN == 0 for d in up.shape[1:]):
            # no rows (an expert-parallel rank can receive none) or dimensions the FP8 GEMMs
            # cannot take (`apply_fp8` leaves such experts unconverted; a module built directly
            # never gathers FP8 forms, `gather_fp8_forms`): the BF16 experts' path
            return super().forward(x, counts)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = fp8_expert_mlp(
                x,
                up,
                down,
                offs,
                # `emulate` was decided for the GPU at `apply_fp8`; off CUDA (a module built
                # directly, run on CPU) only the interpreted Triton product runs
                emulate=self.emulate or not (x.is_cuda or grouped_product_runs(self.grouped_gemm, x.device)),
                owner=self,
                fast_accum=self.fast_accum,
                weight_grad=self.weight_grad,
                grouped_gemm=self.grouped_gemm,
                grouped_tiles=self.grouped_tiles,
                float32_weight_grads=self.float32_weight_grads,
            )
        return out if torch.is_autocast_enabled(x.device.type) else out.to(x.dtype)
