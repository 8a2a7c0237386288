"""`Fp8Rows`: a [rows, K] tensor passed between autograd nodes as its per-row FP8 form.

The routed experts' FP8 products take their input and their output gradient as float8 e4m3 rows
with one power-of-two inverse scale per row (`kernels.fp8.quantize_rows`). Autograd moves one
tensor of a fixed dtype along each edge, so the MoE dispatcher's gather and combine would hand
the experts BF16 rows that the experts then quantize: one more write and read of the largest
activations of the block. An `Fp8Rows` is a BF16-typed tensor (a wrapper subclass, as torchao's
float8 training tensors are) that holds only the FP8 values `q` and inverse scales `inv`: the
dispatcher makes it where quantizing is cheapest (`nemotron.train.fp8_dispatch`), FP8 experts
read `q`/`inv` directly, and any other op sees its dequantized values (`__torch_dispatch__`), so
a consumer that does not know the type computes with exactly the values it represents.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map

from nemotron.kernels.fp8 import FLOAT8

__all__ = ["Fp8Rows", "fp8_rows_parts"]


class Fp8Rows(torch.Tensor):
    """Values `q` [R, K] float8 e4m3 times `inv` [R] float32 (one inverse scale per row), seen
    as a [R, K] tensor of `dtype` (the dtype the rows stand for, BF16 in training)."""

    q: torch.Tensor
    inv: torch.Tensor

    @staticmethod
    def __new__(cls, q: torch.Tensor, inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        if q.dim() != 2 or q.dtype != FLOAT8 or inv.shape != q.shape[:1] or inv.dtype != torch.float32:
            raise ValueError(
                f"Fp8Rows: float8 e4m3 [R, K] values and float32 [R] inverse scales expected, got "
                f"{q.dtype} {tuple(q.shape)} and {inv.dtype} {tuple(inv.shape)}"
            )
        return torch.Tensor._make_wrapper_subclass(cls, q.shape, dtype=dtype, device=q.device)

    def __init__(self, q: torch.Tensor, inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> None:
        self.q, self.inv = q, inv

    def dequantize(self) -> torch.Tensor:
        """The values these rows stand for, as a plain tensor of their dtype."""
        return (self.q.float() * self.inv[:, None]).to(self.dtype)

    def __repr__(self) -> str:  # type: ignore[override]
        return f"Fp8Rows({tuple(self.shape)}, {self.dtype}, device={self.device})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        this = args[0] if args else None
        if isinstance(this, Fp8Rows) and _keeps_rows(func, args, kwargs):
            # An alias of the whole tensor (autograd makes one of an input a Function returns
            # as is, e.g. FSDP2's post-backward hook on a module's inputs): stays FP8 rows.
            return Fp8Rows(this.q, this.inv, this.dtype)

        # Any other op: computed on the dequantized values.
        def plain(t: Any) -> Any:
            return t.dequantize() if isinstance(t, Fp8Rows) else t

        return func(*tree_map(plain, args), **tree_map(plain, kwargs))


_ALIASES = {torch.ops.aten.detach.default, torch.ops.aten.alias.default}
_VIEWS = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default}


def _keeps_rows(func, args, kwargs) -> bool:
    """Whether `func` on an `Fp8Rows` (args[0]) is an alias of all of it: detach, alias, or a
    view to its own shape."""
    if func in _ALIASES:
        return True
    return func in _VIEWS and not kwargs and len(args) == 2 and tuple(args[1]) == tuple(args[0].shape)


def fp8_rows_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q, inv) of an `Fp8Rows`, None for any other tensor."""
    return (x.q, x.inv) if isinstance(x, Fp8Rows) else None
