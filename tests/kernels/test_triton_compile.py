"""Every Triton kernel compiles for a Hopper GPU (sm_90) on the CPU machine, with the argument
types and constexpr values the interpreter checks launched it with (`interpret_checks.py`
records them; Triton ships `ptxas`). The interpreter (`TRITON_INTERPRET=1`, how the kernel
tests run here) accepts code the GPU compiler refuses, e.g. a kernel reading a plain Python
global (found on the H200: the FP8 quantization kernel passed under the interpreter and failed to
compile)."""

import importlib
import pkgutil

import pytest

triton = pytest.importorskip("triton")


def _launched_kernels() -> dict[str, object]:
    """Every `@triton.jit` function of the `*_triton` modules named `*_kernel` (the others are
    device functions the kernels call), by module-qualified name."""
    from triton.runtime.jit import JITFunction

    import nemotron.kernels as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.endswith("_triton"):
            module = importlib.import_module(f"nemotron.kernels.{info.name}")
            for name, value in vars(module).items():
                if isinstance(value, JITFunction) and name.endswith("_kernel"):
                    found[f"{module.__name__}.{name}"] = value
    return found


def _compile_for_hopper(kernel, spec: dict, aligned: tuple[str, ...] = ()):
    """`aligned`: arguments a launch passes 16-aligned (pointers) or as multiples of 16
    (integers), which Triton's launcher tells the compiler and the interpreter's records do not."""
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = {
        name: tl.dtype(value["tl_dtype"]) if isinstance(value, dict) else value
        for name, value in spec["constexprs"].items()
    }
    names = list(spec["signature"])
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=kernel, signature=spec["signature"], constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=spec["options"])


def test_every_kernel_compiles_for_sm90(interpreted):
    kernels = _launched_kernels()
    launches = interpreted["launches"]
    assert set(kernels) <= set(launches), (
        f"kernels no interpreter check launches: {set(kernels) - set(launches)}"
    )
    failures = {}
    for name, kernel in sorted(kernels.items()):
        try:
            compiled = _compile_for_hopper(kernel, launches[name])
        except Exception as err:  # noqa: BLE001 - every kernel's failure is reported
            failures[name] = f"{type(err).__name__}: {str(err)[:600]}"
            continue
        assert compiled.asm["cubin"], name
    assert not failures, "\n\n".join(f"{k}: {v}" for k, v in failures.items())
    # the FP8 quantization with float8 output (the CPU checks launch it writing float32: the
    # interpreter's float8 conversion is not round-to-nearest) uses the hardware conversion
    name = "nemotron.kernels.fp8_triton._quantize_rows_kernel"
    spec = launches[name]
    spec = {**spec, "signature": {**spec["signature"], "X": "*bf16", "Q": "*fp8e4nv"}}
    assert "cvt.rn.satfinite.e4m3x2.f32" in _compile_for_hopper(kernels[name], spec).asm["ptx"]


def test_fp8_weight_grad_kernels_compile_with_float8_operands(interpreted):
    """The CPU checks launch the weight-gradient kernels on float32 operands (the interpreter has
    no float8 products); as training runs them, with float8 operands and outputs, they compile to
    Hopper's FP8 tensor-core instruction and hardware conversions."""
    kernels = _launched_kernels()
    launches = interpreted["launches"]
    name = "nemotron.kernels.fp8_wgrad_triton._grouped_weight_grad_kernel"
    spec = launches[name]
    spec = {
        **spec,
        "signature": {**spec["signature"], "A": "*fp8e4nv", "B": "*fp8e4nv", "C": "*bf16"},
        "constexprs": {**spec["constexprs"], "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128},
        "options": {"num_warps": 8, "num_stages": 3},
    }
    ptx = _compile_for_hopper(kernels[name], spec).asm["ptx"]
    assert "wgmma" in ptx and "e4m3" in ptx
    # at the proxy's shapes every pointer is 16-aligned and every width and stride a multiple of
    # 16: the rows then stream into shared memory 16 bytes at a time, pipelined (cp.async), not
    # one byte per load. (A version sharing its tile preamble with `expert_wgrad_triton` through a
    # `@triton.jit` helper compiled, with Triton 3.6, to 256 byte loads per tile and no pipeline:
    # the FP8 proxy's step 1.19 s -> 5.8 s on an H200, docs/benchmarks.md "Seventeenth round".)
    aligned = ("A", "B", "C", "OFFS", "M", "N", "stride_a", "stride_b", "stride_ce", "stride_cm")
    # one micro-batch's gradient; summed into float32 as it is, or rounded to BF16 first
    for c_type, round_bf16 in (("*bf16", False), ("*fp32", False), ("*fp32", True)):
        fast = {
            **spec,
            "signature": {**spec["signature"], "C": c_type},
            "constexprs": {**spec["constexprs"], "ACCUMULATE": c_type == "*fp32", "ROUND_BF16": round_bf16},
        }
        ptx = _compile_for_hopper(kernels[name], fast, aligned).asm["ptx"]
        assert "cp.async.cg.shared.global" in ptx and "ld.global.b8" not in ptx, (c_type, round_bf16)
    for name, sig in (
        ("nemotron.kernels.fp8_wgrad_triton._transposed_groups_kernel", {"Q": "*fp8e4nv", "OUT": "*fp8e4nv"}),
        ("nemotron.kernels.fp8_triton._quantize_rows_to_kernel", {"X": "*bf16", "Q": "*fp8e4nv"}),
        (
            "nemotron.kernels.fp8_triton._relu2_backward_rows_kernel",
            {"HPRE": "*bf16", "GRAD": "*bf16", "HQ": "*fp8e4nv", "DQ": "*fp8e4nv"},
        ),
    ):
        spec = launches[name]
        spec = {**spec, "signature": {**spec["signature"], **sig}}
        assert "cvt.rn.satfinite.e4m3x2.f32" in _compile_for_hopper(kernels[name], spec).asm["ptx"], name
    # the MoE combine's backward writing FP8 row gradients (`row_grad_fp8`)
    name = "nemotron.kernels.moe_combine_triton._combine_bwd_kernel"
    spec = launches[name]
    spec = {
        **spec,
        "signature": {**spec["signature"], "ROWS": "*bf16", "DY": "*bf16", "DROWS": "*fp8e4nv"},
        "constexprs": {**spec["constexprs"], "NEED_DROWS": True, "NEED_DW": True, "FP8_ROWS": True},
    }
    assert "cvt.rn.satfinite.e4m3x2.f32" in _compile_for_hopper(kernels[name], spec).asm["ptx"], name


@pytest.mark.parametrize("config", [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3)])
def test_expert_weight_grad_kernel_compiles_with_bf16_operands(interpreted, config):
    """The BF16 experts' float32 weight-gradient product (`kernels.expert_wgrad_triton`),
    launched on float32 operands by the CPU checks (the interpreter's BF16 products are not
    IEEE), compiles for Hopper as training runs it: BF16 operands, both read with the rows as
    the contraction (one transposed in registers), at its tiles, to the BF16 tensor-core
    instruction with float32 output."""
    from nemotron.kernels.expert_wgrad_triton import WGRAD_CONFIG

    assert WGRAD_CONFIG in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3)]  # the tiles checked here
    block_m, block_n, block_k, warps, stages = config
    kernels = _launched_kernels()
    name = "nemotron.kernels.expert_wgrad_triton._expert_weight_grad_kernel"
    spec = interpreted["launches"][name]
    spec = {
        **spec,
        "signature": {**spec["signature"], "G": "*bf16", "X": "*bf16", "C": "*fp32"},
        "constexprs": {**spec["constexprs"], "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
        "options": {"num_warps": warps, "num_stages": stages},
    }
    ptx = _compile_for_hopper(kernels[name], spec).asm["ptx"]
    assert "wgmma" in ptx and ".bf16" in ptx


@pytest.mark.parametrize("kernel", ["_grouped_fp8_kernel", "_grouped_fp8_persistent_kernel"])
@pytest.mark.parametrize("use_tma", [True, False])
def test_fp8_grouped_mm_kernel_compiles_with_float8_operands(interpreted, use_tma, kernel):
    """The grouped FP8 product (`kernels.fp8_grouped_triton`), launched on float32 operands by
    the CPU checks, compiles for Hopper as the benchmark runs it: float8 operands at 128-wide
    tiles to the FP8 tensor-core instruction, through TMA descriptors (bulk tensor copies) or
    pointers."""
    kernels = _launched_kernels()
    name = f"nemotron.kernels.fp8_grouped_triton.{kernel}"
    spec = interpreted["launches"][name]
    sig = {"A": "*fp8e4nv", "B": "*fp8e4nv", "OUT": "*bf16"}
    sig |= (
        {"A_DESC": "tensordesc<fp8e4nv[128, 128]>", "B_DESC": "tensordesc<fp8e4nv[128, 128]>"}
        if use_tma
        else {"A_DESC": "constexpr", "B_DESC": "constexpr"}
    )
    constexprs = {
        **spec["constexprs"], "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "USE_TMA": use_tma,
        "MAX_IMPRECISE": None,
    }  # fmt: skip
    if not use_tma:
        constexprs |= {"A_DESC": None, "B_DESC": None}
    spec = {
        **spec,
        "signature": {**spec["signature"], **sig},
        "constexprs": constexprs,
        "options": {"num_warps": 8, "num_stages": 4},
    }
    ptx = _compile_for_hopper(kernels[name], spec).asm["ptx"]
    assert "wgmma" in ptx and "e4m3" in ptx
    assert ("cp.async.bulk.tensor" in ptx) == use_tma


@pytest.mark.parametrize("block_k", [64, 128, 256])
def test_fp8_grouped_mm_exact_accumulation_promotes_to_float32(interpreted, block_k):
    """`fast_accum=False` (`fp8_grouped_triton.promotion_interval`): each run of FP8 `wgmma`
    instructions over min(BLOCK_K, 128) products goes into a zeroed accumulator that is then added
    to the float32 one: one float32 add per accumulator register and promotion (128 x 128 tile,
    8 warps: 64 registers per thread). Fast accumulation (Triton's sm_90 default) has none: the
    tensor cores' accumulator sums the whole contraction."""
    import re

    from nemotron.kernels.fp8_grouped_triton import promotion_interval

    kernels = _launched_kernels()
    name = "nemotron.kernels.fp8_grouped_triton._grouped_fp8_kernel"
    spec = interpreted["launches"][name]
    sig = {
        "A": "*fp8e4nv",
        "B": "*fp8e4nv",
        "OUT": "*bf16",
        "A_DESC": f"tensordesc<fp8e4nv[128, {block_k}]>",
        "B_DESC": f"tensordesc<fp8e4nv[128, {block_k}]>",
    }
    adds = {}
    for fast in (True, False):
        constexprs = {
            **spec["constexprs"], "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": block_k, "USE_TMA": True,
            "MAX_IMPRECISE": promotion_interval(block_k, fast),
        }  # fmt: skip
        compiled = _compile_for_hopper(
            kernels[name],
            {
                **spec,
                "signature": {**spec["signature"], **sig},
                "constexprs": constexprs,
                "options": {"num_warps": 8, "num_stages": 3},
            },
        )
        ptx = compiled.asm["ptx"]
        assert "wgmma.mma_async" in ptx and "e4m3" in ptx
        adds[fast] = len(re.findall(r"\badd(?:\.rn)?\.f32\b", ptx))
    promotions = max(1, block_k // 128)
    assert adds[True] == 0 and adds[False] == 64 * promotions, adds
