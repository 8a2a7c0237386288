"""Mamba-2 SSD (state-space duality) scan: references and the dispatching entry point.

The scan computed by every function here, per batch ``b`` and head ``h`` (head ``h`` reads
group ``h // (heads // groups)`` of ``B`` and ``C``)::

    state_t = state_{t-1} * exp(dt_t * A) + dt_t * outer(x_t, B_t)      # [p, n]
    y_t     = state_t @ C_t                                              # [p]

``dt`` is already softplus'ed and clamped, and there is no ``D`` skip and no gating: the
Mamba-2 mixer adds those. ``initial_state`` / ``final_state`` are ``[b, h, p, n]`` and carry
gradients, so context parallelism can hand states from rank to rank.

``ssd`` runs the Triton kernel (``nemotron.kernels.ssd_triton``) on CUDA tensors when Triton
imports, and the chunked PyTorch reference elsewhere. Internally everything is computed in at
least float32; ``y`` comes back in ``x.dtype`` and ``final_state`` in float32 (float64 for
float64 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "ssd",
    "ssd_chunked_reference",
    "ssd_recurrent_reference",
    "check_ssd_shapes",
    "DEFAULT_CHUNK_SIZE",
]

DEFAULT_CHUNK_SIZE = 128


def check_ssd_shapes(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None,
) -> tuple[int, int, int, int, int, int]:
    """Validate the SSD operand shapes; return ``(b, l, h, p, g, n)``."""
    if x.dim() != 4:
        raise ValueError(f"ssd: x must be [batch, length, heads, head_dim], got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if tuple(dt.shape) != (b, l, h):
        raise ValueError(f"ssd: dt must be {(b, l, h)}, got {tuple(dt.shape)}")
    if tuple(A.shape) != (h,):
        raise ValueError(f"ssd: A must be ({h},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, l):
        raise ValueError(f"ssd: B must be [{b}, {l}, groups, state], got {tuple(B.shape)}")
    if C.shape != B.shape:
        raise ValueError(f"ssd: C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    g, n = B.shape[2], B.shape[3]
    if g < 1 or h % g != 0:
        raise ValueError(f"ssd: groups ({g}) must divide heads ({h})")
    if initial_state is not None and tuple(initial_state.shape) != (b, h, p, n):
        raise ValueError(f"ssd: initial_state must be {(b, h, p, n)}, got {tuple(initial_state.shape)}")
    return b, l, h, p, g, n


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _heads_from_groups(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, l, g, n] -> [b, l, h, n] with head h reading group h // (heads // g)."""
    return t.repeat_interleave(heads // t.shape[2], dim=2)


def ssd_recurrent_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-by-step recurrence (the ground truth). ``chunk_size`` is accepted and ignored."""
    del chunk_size
    b, l, h, p, g, n = check_ssd_shapes(x, dt, A, B, C, initial_state)
    cd = _compute_dtype(x)
    xf, dtf, Af = x.to(cd), dt.to(cd), A.to(cd)
    Bh = _heads_from_groups(B.to(cd), h)
    Ch = _heads_from_groups(C.to(cd), h)
    state = x.new_zeros((b, h, p, n), dtype=cd) if initial_state is None else initial_state.to(cd)
    ys = []
    for t in range(l):
        decay = torch.exp(dtf[:, t] * Af)  # [b, h]
        update = (dtf[:, t, :, None, None] * xf[:, t, :, :, None]) * Bh[:, t, :, None, :]
        state = state * decay[:, :, None, None] + update
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros((b, 0, h, p))
    return y.to(x.dtype), state


def _segment_sum_exp(a: torch.Tensor) -> torch.Tensor:
    """For cumulative log-decays a[..., T], return exp(a_i - a_j) for i >= j and 0 above the diagonal."""
    T = a.shape[-1]
    diff = a[..., :, None] - a[..., None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    # Mask before exp: above the diagonal the difference can be large and positive.
    return torch.exp(torch.where(causal, diff, torch.full_like(diff, float("-inf"))))


def ssd_chunked_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked SSD algorithm in plain PyTorch (differentiable by autograd).

    Within a chunk the scan is a masked, decay-weighted attention-like product; across chunks a
    short recurrence passes the ``[p, n]`` state. Lengths that are not a multiple of
    ``chunk_size`` are padded with ``dt = 0`` (no decay, no input), which leaves the result exact.
    """
    b, l, h, p, g, n = check_ssd_shapes(x, dt, A, B, C, initial_state)
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE
    if chunk_size < 1:
        raise ValueError(f"ssd: chunk_size must be positive, got {chunk_size}")
    cd = _compute_dtype(x)
    Q = chunk_size
    nc = max(1, -(-l // Q))
    pad = nc * Q - l

    xf, dtf, Af = x.to(cd), dt.to(cd), A.to(cd)
    Bf, Cf = B.to(cd), C.to(cd)
    if pad:
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        dtf = F.pad(dtf, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
    hpg = h // g
    # Chunked views; B and C stay per group, heads are split as (g, heads-per-group).
    xc = xf.reshape(b, nc, Q, g, hpg, p)
    uc = xc * dtf.reshape(b, nc, Q, g, hpg, 1)  # dt_t * x_t
    Bc = Bf.reshape(b, nc, Q, g, n)
    Cc = Cf.reshape(b, nc, Q, g, n)
    a = (dtf * Af).reshape(b, nc, Q, g, hpg).permute(0, 3, 4, 1, 2).cumsum(-1)  # [b,g,r,c,Q]

    # 1. Within each chunk: y_i += sum_{j<=i} (C_i.B_j) exp(a_i - a_j) u_j.
    decay = _segment_sum_exp(a)  # [b,g,r,c,Q,Q]
    cb = torch.einsum("bcign,bcjgn->bgcij", Cc, Bc)  # [b,g,c,Q,Q]
    y = torch.einsum("bgcij,bgrcij,bcjgrp->bcigrp", cb, decay, uc)

    # 2. Each chunk's own contribution to the state at its end.
    a_last = a[..., -1:]  # [b,g,r,c,1]
    to_end = torch.exp(a_last - a)  # [b,g,r,c,Q]
    chunk_states = torch.einsum("bcjgn,bgrcj,bcjgrp->bcgrpn", Bc, to_end, uc)

    # 3. Pass states across chunks: S_{c+1} = exp(a_last_c) S_c + chunk_states_c.
    if initial_state is None:
        state = xf.new_zeros((b, g, hpg, p, n))
    else:
        state = initial_state.to(cd).reshape(b, g, hpg, p, n)
    chunk_decay = torch.exp(a_last[..., 0])  # [b,g,r,c]
    entering = []
    for c in range(nc):
        entering.append(state)
        state = state * chunk_decay[..., c, None, None] + chunk_states[:, c]
    states_in = torch.stack(entering, dim=1)  # [b,c,g,r,p,n]

    # 4. Contribution of the state entering each chunk: y_i += exp(a_i) C_i . S_c.
    y = y + torch.einsum("bcign,bgrci,bcgrpn->bcigrp", Cc, torch.exp(a), states_in)

    y = y.reshape(b, nc * Q, h, p)[:, :l]
    return y.to(x.dtype), state.reshape(b, h, p, n)


def _triton_available() -> bool:
    from nemotron.kernels import fast_paths_enabled, triton_available

    return fast_paths_enabled() and triton_available()


def triton_supports(x: torch.Tensor, chunk_size: int) -> bool:
    """The Triton kernel needs a CUDA tensor below float64 and a power-of-two chunk of at least 16."""
    power_of_two = chunk_size > 0 and chunk_size & (chunk_size - 1) == 0
    return x.is_cuda and x.dtype != torch.float64 and power_of_two and chunk_size >= 16


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan the Mamba-2 mixer calls: Triton on CUDA (if available), chunked reference
    elsewhere, and for what the kernel does not take (another chunk size, B or C in a dtype
    other than x's). ``chunk_size=None`` means `DEFAULT_CHUNK_SIZE`, as for the references."""
    if chunk_size is None:  # (the comparison in `triton_supports` raised a TypeError)
        chunk_size = DEFAULT_CHUNK_SIZE
    # the kernel's dots take B and C in x's dtype (`ssd_triton` raises a TypeError otherwise)
    same_dtype = B.dtype == x.dtype and C.dtype == x.dtype
    if triton_supports(x, chunk_size) and same_dtype and _triton_available():
        from nemotron.kernels.ssd_triton import ssd_triton

        return ssd_triton(x, dt, A, B, C, chunk_size, initial_state)
    return ssd_chunked_reference(x, dt, A, B, C, chunk_size, initial_state)
