"""Triton kernels compile for a Hopper GPU (sm_90) on a CPU-only machine: the interpreter
(`TRITON_INTERPRET=1`, how the other kernel tests run) accepts code the GPU compiler refuses,
such as a kernel reading a plain Python global (found on the H200: the FP8 quantization kernel
ran under the interpreter and failed to compile)."""

import pytest

triton = pytest.importorskip("triton")


def _compile_for_hopper(kernel, signature: dict, constexprs: dict):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    try:
        return triton.compile(source, target=GPUTarget("cuda", 90, 32))
    except (ImportError, KeyError, RuntimeError) as err:  # a Triton build without the CUDA backend
        if "backend" in str(err).lower() or "ptxas" in str(err).lower():
            pytest.skip(f"this Triton cannot compile for CUDA here: {err}")
        raise


@pytest.mark.parametrize("relu2", [False, True])
def test_fp8_rowwise_quantization_kernel_compiles_for_sm90(relu2):
    from nemotron.kernels.fp8_triton import _quantize_rows_kernel

    signature = {
        "X": "*bf16",
        "Q": "*fp8e4nv",
        "INV": "*fp32",
        "n_rows": "i32",
        "n_cols": "i32",
        "stride_x": "i32",
        "stride_q": "i32",
        "fp8_max": "fp32",
        "eps": "fp32",
        "BLOCK_K": "constexpr",
        "ROWS": "constexpr",
        "RELU2": "constexpr",
    }
    compiled = _compile_for_hopper(
        _quantize_rows_kernel, signature, {"BLOCK_K": 4096, "ROWS": 2, "RELU2": relu2}
    )
    ptx = compiled.asm["ptx"]
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx  # the hardware's round-to-nearest float8 conversion
