"""Context parallelism (CP): every sequence split across the ranks of a CP group.

Layout (load-balanced for causal attention): a sequence of length S is cut into 2*CP chunks
of S/(2*CP) tokens; CP rank r holds chunks r and 2*CP-1-r, concatenated (`cp_shard`). Every
rank then does the same amount of causal attention work, and a rank's two chunks are always
two separate stretches of the sequence, which the attention and Mamba-2 operations below treat
as such. Embeddings, norms, MLP/MoE and the LM-head loss are token-local and need nothing.

The single-device modules call into a `ContextParallel` object that `parallelize` sets as their
`context_parallel` attribute (None by default; the extension points are listed in
`nemotron.models.nano3.parallel`):

- attention: K and V of the local chunks are all-gathered over the CP group (autograd-correct:
  the backward sums every rank's K/V gradient back to the owner), put in sequence order, and
  each local query chunk attends to the causal prefix of the whole sequence that ends with it
  (SDPA with a lower-right causal mask; GQA kept);
- Mamba-2 conv1d: each local chunk receives the last kernel-1 pre-convolution positions of the
  chunk preceding it in the sequence (a differentiable all-gather of those few positions);
- Mamba-2 SSD: each local chunk is scanned from a zero state, returning its final state; the
  final states and total decays of all 2*CP chunks are all-gathered and combined in sequence
  order into every chunk's true initial state h0, and each chunk's output is corrected by the
  contribution of that state, y_t += C_t . (exp(sum_{s<=t} dt_s A) h0) (exact: the scan is
  linear in the state);
- MoE: the sequence balance loss is computed on the scores all-gathered over CP, so it is the
  whole sequence's value.

Gradients: CP ranks hold different tokens of the same samples, so FSDP2 reduces replicated
parameters over DP x CP (mean), and every collective above sums gradients in backward.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from nemotron.kernels.conv1d import causal_conv1d
from nemotron.kernels.ssd import ssd as ssd_scan
from nemotron.models.nano3.attention import Attention
from nemotron.models.nano3.mamba2 import Mamba2Mixer

# torch >= 2.13 names it all_gather_single_autograd (the older name warns)
_all_gather_autograd = (
    getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
)


class ContextParallelError(ValueError):
    """A sequence that cannot be split over the context-parallel ranks."""


# -- layout -------------------------------------------------------------------------------------


def cp_chunk_ids(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """Global chunk indices (of 2*cp_size) held by `cp_rank`, in local order."""
    return cp_rank, 2 * cp_size - 1 - cp_rank


def _check_divisible(length: int, cp_size: int) -> int:
    if length % (2 * cp_size):
        raise ContextParallelError(
            f"sequence length {length} is not divisible by 2 * context_parallel_size = "
            f"{2 * cp_size} (each CP rank holds two equal chunks)"
        )
    return length // (2 * cp_size)


def cp_shard(x: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> torch.Tensor:
    """This CP rank's part of `x` along `dim`: chunks r and 2*CP-1-r of 2*CP, concatenated."""
    if cp_size == 1:
        return x
    chunk = _check_divisible(x.shape[dim], cp_size)
    first, second = cp_chunk_ids(cp_rank, cp_size)
    return torch.cat([x.narrow(dim, first * chunk, chunk), x.narrow(dim, second * chunk, chunk)], dim=dim)


def cp_unshard(parts: list[torch.Tensor] | tuple[torch.Tensor, ...], dim: int = 1) -> torch.Tensor:
    """Inverse of `cp_shard`: the local parts of every CP rank (in rank order) -> the sequence."""
    cp_size = len(parts)
    if cp_size == 1:
        return parts[0]
    chunks: list[torch.Tensor | None] = [None] * (2 * cp_size)
    for rank, part in enumerate(parts):
        half = part.shape[dim] // 2
        first, second = cp_chunk_ids(rank, cp_size)
        chunks[first] = part.narrow(dim, 0, half)
        chunks[second] = part.narrow(dim, half, half)
    return torch.cat(cast(list[torch.Tensor], chunks), dim=dim)  # every chunk is filled


# -- the hook object ----------------------------------------------------------------------------


class ContextParallel:
    """Collective operations of one CP group, called by the model's attention / Mamba-2 / MoE
    code when set as their `context_parallel` attribute."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.chunk_ids = cp_chunk_ids(self.rank, self.size)

    def all_gather(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every rank's `x`, in rank order; the backward reduce-scatters (sums every rank's
        gradient into the owner). PyTorch's functional collectives, autograd variant."""
        gathered = _all_gather_autograd(x.unsqueeze(0).contiguous(), 0, self.group)
        if isinstance(gathered, funcol.AsyncCollectiveTensor):
            gathered = gathered.wait()
        return tuple(gathered.unbind(0))

    def gather_sequence(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole sequence from every rank's local part, in sequence order (differentiable)."""
        if not x.requires_grad:
            parts = [torch.empty_like(x) for _ in range(self.size)]
            dist.all_gather(parts, x.contiguous(), group=self.group)
            return cp_unshard(parts, dim)
        return cp_unshard(self.all_gather(x), dim)

    # -- attention ------------------------------------------------------------------------------

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal SDPA of the local queries over the whole sequence. q [b, Hq, s_local, d],
        k/v [b, Hkv, s_local, d] (local = this rank's two chunks) -> [b, Hq, s_local, d]."""
        chunk = q.shape[2] // 2
        k_full, v_full = self.gather_sequence(k, 2), self.gather_sequence(v, 2)
        gqa = q.shape[1] != k.shape[1]
        outs = []
        for i, chunk_id in enumerate(self.chunk_ids):
            end = (chunk_id + 1) * chunk  # keys [0, end): the causal prefix ending at this chunk
            outs.append(
                F.scaled_dot_product_attention(
                    q[:, :, i * chunk : (i + 1) * chunk],
                    k_full[:, :, :end],
                    v_full[:, :, :end],
                    attn_mask=causal_lower_right(chunk, end),
                    enable_gqa=gqa,
                )
            )
        return torch.cat(outs, dim=2)

    # -- Mamba-2 --------------------------------------------------------------------------------

    def causal_conv1d(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The mixer's depthwise causal conv (no activation) over the local chunks, each fed the
        kernel-1 positions before it in the sequence. x [b, s_local, channels], weight
        [channels, 1, kernel] (nn.Conv1d's), bias [channels] -> [b, s_local, channels]."""
        b, s, ch = x.shape
        chunk = s // 2
        halo = weight.shape[-1] - 1
        if chunk < halo:
            raise ContextParallelError(
                f"context parallel: chunks of {chunk} tokens are shorter than the conv1d "
                f"context of {halo}; use a longer sequence or a smaller context_parallel_size"
            )
        chunks = x.view(b, 2, chunk, ch)
        tails = self.all_gather(chunks[:, :, chunk - halo :])  # per rank [b, 2, halo, ch]
        by_chunk: dict[int, torch.Tensor] = {}
        for rank, tail in enumerate(tails):
            for i, chunk_id in enumerate(cp_chunk_ids(rank, self.size)):
                by_chunk[chunk_id] = tail[:, i]
        padded = []
        for i, chunk_id in enumerate(self.chunk_ids):
            left = by_chunk[chunk_id - 1] if chunk_id > 0 else x.new_zeros(b, halo, ch)
            padded.append(torch.cat([left, chunks[:, i]], dim=1))
        inp = torch.stack(padded, dim=1).reshape(2 * b, halo + chunk, ch)
        # causal: output position t reads inputs t-halo..t, so past the halo every output has
        # its real left context
        out = causal_conv1d(inp, weight, bias, activation=None)[:, halo:]
        return out.reshape(b, s, -1)

    def ssd(
        self,
        x: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        chunk_size: int,
        initial_state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`kernels.ssd.ssd` over the whole sequence, given this rank's two chunks of it (shapes
        as `ssd` with the local length). Returns (y of the local chunks, the state at the end
        of the sequence)."""
        if initial_state is not None:
            raise ContextParallelError("context-parallel SSD starts the sequence from zero state")
        b, s, h, p = x.shape
        g, n = B.shape[2], B.shape[3]
        chunk = s // 2

        def per_chunk(t: torch.Tensor) -> torch.Tensor:  # [b, 2*chunk, ...] -> [2b, chunk, ...]
            return t.reshape(2 * b, chunk, *t.shape[2:])

        y, final = ssd_scan(per_chunk(x), per_chunk(dt), A, per_chunk(B), per_chunk(C), chunk_size)
        cd = final.dtype
        log_decay = torch.cumsum(per_chunk(dt).to(cd) * A.to(cd), dim=1)  # [2b, chunk, h]

        finals = self.all_gather(final.view(b, 2, h, p, n))
        totals = self.all_gather(log_decay[:, -1].reshape(b, 2, h))
        final_of, total_of = {}, {}
        for rank in range(self.size):
            for i, chunk_id in enumerate(cp_chunk_ids(rank, self.size)):
                final_of[chunk_id], total_of[chunk_id] = finals[rank][:, i], totals[rank][:, i]
        # Prefix combination in sequence order: the state entering each chunk.
        state = final.new_zeros(b, h, p, n)
        entering = []
        for chunk_id in range(2 * self.size):
            entering.append(state)
            state = state * total_of[chunk_id].exp()[..., None, None] + final_of[chunk_id]
        h0 = torch.stack([entering[c] for c in self.chunk_ids], dim=1).reshape(2 * b, g, h // g, p, n)
        # Contribution of the entering state: y_t += exp(a_t) * C_t . h0 (head h reads group
        # h // (heads/groups), as in the scan).
        Cc = per_chunk(C).to(cd)
        correction = torch.einsum("btgn,bgrpn->btgrp", Cc, h0).reshape(2 * b, chunk, h, p)
        y = (y.to(cd) + correction * log_decay.exp()[..., None]).to(x.dtype)
        return y.reshape(b, s, h, p), state


# -- applying it to a model ---------------------------------------------------------------------


def apply_context_parallel(model: nn.Module, cp: ContextParallel) -> None:
    """Give every attention and Mamba-2 mixer of a `Nano3ForCausalLM` the object `cp` (their
    `context_parallel` extension point). The MoE balance loss's gather is set by `parallelize`
    (it composes with tensor parallelism's)."""
    for module in model.modules():
        if isinstance(module, (Attention, Mamba2Mixer)):
            module.context_parallel = cp
