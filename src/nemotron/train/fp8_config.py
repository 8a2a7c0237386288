"""`train.fp8`'s typed config and its checks (no torch import: config loading stays light).
What the keys do is in `nemotron.train.fp8`."""

from __future__ import annotations

from dataclasses import dataclass, field

# Which layers `train.fp8.layers` may name; the router, norms and embeddings always stay in
# higher precision. `lm_head`: the chunked LM-head loss's logit and hidden-gradient products
# (opt-in: the logits' precision is the one place FP8 touches the loss directly).
FP8_LAYERS = ("mamba", "attention", "shared_expert", "mlp", "experts", "lm_head")
# The default: the dense linears (1.07x BF16's tokens/s on the proxy, one H200, 2026-12-03:
# docs/benchmarks.md "FP8 training"). Opt-in: `lm_head` (1.16x with it; the logits and all of
# the head's gradients go through FP8) and `experts` (1.23-1.25x with every layer).
DEFAULT_FP8_LAYERS = ("mamba", "attention", "shared_expert", "mlp")
# torchao's float8 recipes for the dense linears (`Float8LinearRecipeName`):
#   tensorwise: one dynamic scale per tensor (cuBLAS FP8 GEMMs, the fastest);
#   rowwise: one scale per row of each operand, scales rounded to powers of two (CUTLASS);
#   rowwise_with_gw_hp: rowwise, but the weight gradient GEMM in bf16 (most accurate).
# The routed experts and the LM head have their own fixed schemes (train/fp8_grouped.py:
# rowwise activations, weights per row and per expert matrix; kernels/cross_entropy.py: one
# scale per tensor).
RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
# The routed experts' weight-gradient products (`train.fp8.experts_weight_grad`), the default first.
EXPERT_WEIGHT_GRADS = ("bf16", "fp8")
# The routed experts' forward and input-gradient products (`train.fp8.experts_grouped_gemm`):
# PyTorch's CUTLASS kernel (`torch._scaled_grouped_mm`, the default) or `kernels.fp8_grouped_triton`.
EXPERT_GROUPED_GEMMS = ("cutlass", "triton")
# `train.fp8.experts_grouped_tiles`, in order: the Triton product's (BLOCK_M, BLOCK_N, BLOCK_K,
# stages, warps, use_tma, persistent) (`kernels.fp8_grouped_triton.GroupedConfig`).
GROUPED_TILE_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "stages", "warps", "use_tma", "persistent")
# Shared memory one program may take on sm_90 (H100/H200: 227 KiB per block, opted in).
SM90_SHARED_BYTES = 232448


@dataclass
class Fp8Config:
    """`train.fp8`: off by default."""

    enabled: bool = False
    recipe: str = "tensorwise"  # dense linears: one of RECIPES
    layers: list[str] = field(default_factory=lambda: list(DEFAULT_FP8_LAYERS))  # subset of FP8_LAYERS
    # FSDP2 all-gathers the float8 weights instead of bf16 (half the bytes; tensorwise only).
    # Pays with several data-parallel ranks; on one GPU there is no all-gather to shrink.
    fsdp_float8_all_gather: bool = False
    # The routed experts' two FP8 weight forms made by FSDP2's all-gather in place of their BF16
    # unsharded weights (`nemotron.train.fp8_gather`): once per optimizer step with
    # `train.fsdp_accumulate_unsharded`, no extra memory (on one H200 no faster than quantizing
    # per micro-batch: docs/benchmarks.md, eighth round). Needs FSDP2
    # (bf16 compute weights) and `experts` in `layers`; without FSDP it changes nothing. The
    # experts' weight gradients are then float32 tensors (FSDP2 holds no BF16 copy) holding each
    # micro-batch's product rounded to BF16, as the BF16 experts' do, or unrounded with
    # `train.experts_float32_grads`; with `experts_weight_grad=fp8` the FP8 product sums them over
    # the step's micro-batches itself (`kernels.fp8.summed_weight_grads`) instead of FSDP2.
    experts_fsdp_float8_all_gather: bool = False
    # Compile each converted linear on CUDA (fuses torchao's scale and cast ops).
    compile: bool = True
    # Tune the compiled linears' cast and amax kernels (Inductor's pointwise autotuning and
    # coordinate-descent tuning of block sizes and warps, `nemotron.train.fp8.CAST_TUNING`): a
    # longer first step, possibly faster casts. Needs `compile`.
    autotune_casts: bool = False
    # The routed experts' and the LM head's FP8 weight copies (per row and transposed) made once
    # per optimizer step and reused by every micro-batch, held for the step: one byte per weight
    # element per form, the size of those weights in BF16 (the torchao dense linears quantize
    # per call either way). Off by default: it pays only with memory to spare (H200, proxy at
    # 137 of 139 GiB reserved: the held copies caused allocator retries and a slower step).
    # With `experts_fsdp_float8_all_gather` only the LM head's copies are held (the experts'
    # forms come from the gather): 0.7 GB on the proxy, no faster on one H200 either.
    reuse_weights: bool = False
    # `lm_head`: rows of hidden states per FP8 scale group and per weight-gradient product
    # (rounded down to whole 4,096-row chunks). Larger: fewer [V, h] accumulations, and the
    # group's transposed logit gradient held (V bytes per row: 1 GiB per 8,192 rows at
    # V = 131,072). A whole micro-batch (24,576 on the one-GPU proxy) was ~1% faster with every
    # FP8 layer but sent the proxy with BF16 experts into allocator retries (docs/benchmarks.md).
    lm_head_group_rows: int = 8192
    # The FP8 products accumulate in the tensor cores' own accumulator (`use_fast_accum`): 4-9%
    # faster dense linears, 12-22% faster grouped products on an H200, an error well below the FP8
    # roundings of the operands (`nemotron.kernels.fp8`). Every product but the LM head's hidden
    # gradient (a contraction over the vocabulary). false: every FP8 product accumulates with
    # float32 promotion (torchao's recipes alone use fast accumulation for the forward only).
    fast_accum: bool = True
    # The routed experts' weight gradients: "bf16" (BF16 products of BF16 operands) or "fp8"
    # (FP8 products, the operands made from the per-row FP8 forms the other products take,
    # one scale per expert: `nemotron.kernels.fp8_wgrad`). Needs `experts` in `layers`.
    experts_weight_grad: str = "bf16"
    # The routed experts' forward and input-gradient FP8 products (`nemotron.train.fp8_grouped`):
    # "cutlass" (PyTorch's `torch._scaled_grouped_mm`, whose tile PyTorch picks from the groups'
    # mean row count) or "triton" (`nemotron.kernels.fp8_grouped_triton`, the tiles below; the
    # same roundings of the operands, another order of the sums). Needs `experts` in `layers`.
    # Emulated without FP8 tensor cores either way (on CPU under TRITON_INTERPRET=1, "triton"
    # runs the kernel in Triton's interpreter: slow, for tests).
    experts_grouped_gemm: str = "cutlass"
    # "triton"'s tiles as [BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, use_tma (0/1), persistent
    # (0/1)] (`benchmarks/fp8_gemms.py --parts grouped_triton` prints the fastest it measured in
    # this form); null: the kernel's `DEFAULT_CONFIG`.
    experts_grouped_tiles: list[int] | None = None


def experts_float32_grads_problem(experts_float32_grads: bool, fp8: Fp8Config) -> str | None:
    """Why `train.experts_float32_grads` cannot hold with this `train.fp8`, or None: FP8 routed
    experts keep float32 weight gradients only when FSDP2 gathers their FP8 forms (their unit
    then keeps the float32 master dtype); gathering BF16 copies, FSDP2 hands back BF16
    gradients whatever the product writes."""
    if (
        experts_float32_grads
        and fp8.enabled
        and "experts" in fp8.layers
        and not fp8.experts_fsdp_float8_all_gather
    ):
        return (
            "with FP8 routed experts (train.fp8.layers has 'experts') needs "
            "train.fp8.experts_fsdp_float8_all_gather=true: FSDP2 otherwise gathers BF16 copies of "
            "their weights, whose gradients are BF16 whatever the product writes"
        )
    return None


def tp_recipe_message(recipe: str, tensor_parallel: int) -> str:
    """Why `recipe` cannot run under tensor parallelism (one text for the config check and
    `apply_fp8`)."""
    return (
        f"{recipe!r} does not compose with tensor parallelism "
        f"(model.tensor_model_parallel_size={tensor_parallel}): torchao's float8 tensor-parallel "
        "styles take one scale per tensor; use train.fp8.recipe=tensorwise"
    )


def grouped_tiles_problem(tiles: object) -> str | None:
    """Why `tiles` is not a `train.fp8.experts_grouped_tiles` value the Triton grouped FP8
    product compiles to Hopper's FP8 tensor-core path (`wgmma`) with, or None. The bounds are
    Triton's (3.6-3.9): `wgmma` needs a tile of a multiple of 64 rows (smaller ones fall back to
    the pre-Hopper `mma`) and 4 or 8 warps; an FP8 `wgmma` contracts 32 values, so BLOCK_K >= 32;
    `tl.dot` takes no dimension under 16; TMA boxes are at most 256 wide; the pipeline's
    buffers, stages x (BLOCK_M + BLOCK_N) x BLOCK_K bytes, must fit an sm_90 program's shared
    memory."""
    if not isinstance(tiles, (list, tuple)) or len(tiles) != len(GROUPED_TILE_FIELDS):
        return f"must be a list of {len(GROUPED_TILE_FIELDS)} integers {list(GROUPED_TILE_FIELDS)}, got {tiles!r}"
    bad = [v for v in tiles if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        return f"must be integers {list(GROUPED_TILE_FIELDS)}, got {tiles!r}"
    m, n, k, stages, warps, tma, persistent = tiles
    pow2 = (16, 32, 64, 128, 256)
    wrong = []
    if m not in (64, 128, 256):
        wrong.append(
            f"BLOCK_M {m} is not 64, 128 or 256 (Hopper's FP8 tensor-core path takes 64-row multiples)"
        )
    if n not in pow2:
        wrong.append(f"BLOCK_N {n} is not a power of two from 16 to 256")
    if k not in pow2[1:]:
        wrong.append(f"BLOCK_K {k} is not a power of two from 32 to 256 (an FP8 wgmma contracts 32)")
    if stages < 1:
        wrong.append(f"stages {stages} is not at least 1")
    if warps not in (4, 8):
        wrong.append(f"warps {warps} is not 4 or 8")
    if tma not in (0, 1):
        wrong.append(f"use_tma {tma} is not 0 or 1")
    if persistent not in (0, 1):
        wrong.append(f"persistent {persistent} is not 0 or 1")
    if not wrong and stages * (m + n) * k > SM90_SHARED_BYTES:
        wrong.append(
            f"stages x (BLOCK_M + BLOCK_N) x BLOCK_K = {stages * (m + n) * k} bytes of pipeline buffers "
            f"exceed an sm_90 program's {SM90_SHARED_BYTES} bytes of shared memory"
        )
    if wrong:
        return f"{tiles!r}: " + "; ".join(wrong)
    return None


def check_fp8_config(fp8: Fp8Config, precision: str, tensor_parallel: int) -> list[tuple[str, str]]:
    """Problems with `train.fp8` as (dotted key, message) pairs; empty when it is valid.
    Checked whether or not it is enabled, except what only matters when it is."""
    problems = []
    if fp8.recipe not in RECIPES:
        problems.append(("train.fp8.recipe", f"{fp8.recipe!r} is not one of {list(RECIPES)}"))
    unknown = [name for name in fp8.layers if name not in FP8_LAYERS]
    if unknown:
        problems.append(
            (
                "train.fp8.layers",
                f"unknown layer kinds {unknown}; choose from {list(FP8_LAYERS)} "
                "(router, norms and embeddings stay higher precision)",
            )
        )
    if len(set(fp8.layers)) != len(fp8.layers):
        problems.append(("train.fp8.layers", f"names a layer kind twice: {fp8.layers}"))
    if (
        isinstance(fp8.lm_head_group_rows, bool)
        or not isinstance(fp8.lm_head_group_rows, int)
        or fp8.lm_head_group_rows < 1
    ):
        problems.append(
            (
                "train.fp8.lm_head_group_rows",
                f"must be a positive number of rows, got {fp8.lm_head_group_rows!r}",
            )
        )
    # the routed experts' choices: one of their values; other than the default (first) only with experts
    for name, value, choices, what in (
        (
            "experts_weight_grad",
            fp8.experts_weight_grad,
            EXPERT_WEIGHT_GRADS,
            "sets the routed experts' weight gradients",
        ),
        (
            "experts_grouped_gemm",
            fp8.experts_grouped_gemm,
            EXPERT_GROUPED_GEMMS,
            "chooses the routed experts' FP8 products",
        ),
    ):
        if value not in choices:
            problems.append((f"train.fp8.{name}", f"{value!r} is not one of {list(choices)}"))
        elif value != choices[0] and "experts" not in fp8.layers:
            problems.append(
                (f"train.fp8.{name}", f"{what}, but train.fp8.layers {fp8.layers} has no 'experts'")
            )
    if fp8.experts_grouped_tiles is not None:
        tiles_problem = grouped_tiles_problem(fp8.experts_grouped_tiles)
        if tiles_problem:
            problems.append(("train.fp8.experts_grouped_tiles", tiles_problem))
        elif fp8.experts_grouped_gemm != "triton":
            problems.append(
                (
                    "train.fp8.experts_grouped_tiles",
                    f"are the Triton product's tiles, but train.fp8.experts_grouped_gemm is "
                    f"{fp8.experts_grouped_gemm!r} (set it to 'triton')",
                )
            )
    if fp8.fsdp_float8_all_gather and fp8.recipe != "tensorwise":
        problems.append(
            (
                "train.fp8.fsdp_float8_all_gather",
                f"needs train.fp8.recipe=tensorwise (got {fp8.recipe!r}): float8 weights "
                "are gathered with one scale per tensor",
            )
        )
    if fp8.autotune_casts and not fp8.compile:
        problems.append(
            ("train.fp8.autotune_casts", "tunes the compiled linears' kernels: needs train.fp8.compile=true")
        )
    if fp8.experts_fsdp_float8_all_gather and "experts" not in fp8.layers:
        problems.append(
            (
                "train.fp8.experts_fsdp_float8_all_gather",
                f"gathers the routed experts' FP8 forms, but train.fp8.layers {fp8.layers} has no 'experts'",
            )
        )
    if fp8.enabled:
        if not fp8.layers:
            # on, yet nothing would be converted: a run that only looks like an FP8 run
            problems.append(
                (
                    "train.fp8.layers",
                    f"is empty, so train.fp8.enabled=true would convert nothing; name layer kinds "
                    f"from {list(FP8_LAYERS)} (or set train.fp8.enabled=false)",
                )
            )
        if precision != "bf16":
            problems.append(
                (
                    "train.fp8.enabled",
                    f"needs train.precision=bf16, got {precision!r} (the "
                    "layers FP8 leaves out compute in bf16)",
                )
            )
        if tensor_parallel > 1 and fp8.recipe != "tensorwise" and fp8.recipe in RECIPES:
            problems.append(("train.fp8.recipe", tp_recipe_message(fp8.recipe, tensor_parallel)))
    return problems
