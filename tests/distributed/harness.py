"""Train a tiny Nano3 for a few steps single-process and under a parallel layout; compare."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from models.tiny import tiny_config  # the one tiny Nano3 of the test suite (tests/models/tiny.py)
from torch.distributed.tensor import DTensor

from nemotron.distributed import ParallelDims, ParallelismConfig, build_mesh, parallelize
from nemotron.distributed.context_parallel import cp_shard
from nemotron.distributed.utils import clip_grad_norm_, token_loss_weight
from nemotron.kernels.cross_entropy import IGNORE_INDEX
from nemotron.models.nano3 import Nano3ForCausalLM
from nemotron.train.balancing import update_expert_biases

GLOBAL_BATCH, SEQ, LR, BIAS_RATE = 4, 8, 0.05, 0.01


def batch(step: int, seq: int = SEQ, uniform_mask: bool = False):
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, 96, (GLOBAL_BATCH, seq + 1), generator=g)
    # uneven loss-token counts per sample (hence per DP / CP rank): the token mean of the global
    # batch differs from a mean of per-rank means
    loss_mask = (torch.rand(GLOBAL_BATCH, seq, generator=g) < 0.6).float()
    loss_mask[:, 0] = 1.0
    if uniform_mask:  # every token counts: each rank's token weight is exactly 1
        loss_mask.fill_(1.0)
    return tokens[:, :-1], tokens[:, 1:], loss_mask


def full_grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if isinstance(g, DTensor):
            g = g.full_tensor()
        out[name.replace("_orig_mod.", "")] = g.detach().clone()
    return out


def _plain_name(name: str) -> str:
    """The single-device model's name (no compile or activation-checkpoint wrapper level)."""
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


def full_params(model) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer (expert biases) as a full tensor, by name."""
    out = {}
    for name, value in model.state_dict().items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        out[_plain_name(name)] = full.detach().clone()
    return out


def assert_same_tensors(got: dict, want: dict, where: str, **tol) -> None:
    assert got.keys() == want.keys(), f"{where}: {sorted(got.keys() ^ want.keys())}"
    for name, value in got.items():
        torch.testing.assert_close(value, want[name], **tol, msg=lambda m: f"{where}, {name}: {m}")


def full_state(model, opt) -> dict:
    """Parameters, persistent buffers and every AdamW state tensor, gathered, by name (as numpy
    arrays: tensors would cross to the test process through shared memory that the worker's
    exit frees)."""
    state = full_params(model)
    for name, param in model.named_parameters():
        for key, value in opt.state[param].items():
            full = value.full_tensor() if isinstance(value, DTensor) else value
            state[f"optim.{_plain_name(name)}.{key}"] = full.detach().clone()
    return {name: value.numpy() for name, value in state.items()}


def tensors(state: dict) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(value) for name, value in state.items()}


def pad_rows(ids, labels, mask):
    """Rows 1 and 3 as shorter samples right-padded to the batch's length, as the loader pads a
    mixed-length micro-batch (token 0, labels ignored, loss mask 0); -> (..., padding mask)."""
    padding = torch.zeros_like(labels, dtype=torch.bool)
    seq = labels.shape[1]
    padding[1, seq // 2 :] = True
    padding[3, seq - 3 :] = True
    ids, labels, mask = (
        ids.masked_fill(padding, 0),
        labels.masked_fill(padding, IGNORE_INDEX),
        mask.masked_fill(padding, 0),
    )
    return ids, labels, mask, padding


def compiled_graphs() -> int:
    """How many graphs Dynamo has compiled in this process: each frame's first and every
    recompile (a guard that failed on a new size, say)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def assert_no_new_graphs(since: int, where: str) -> None:
    """No graph compiled after the first step: the later steps route their tokens otherwise
    (every expert's row count changes), and the compiled code must not depend on that."""
    new = compiled_graphs() - since
    assert new == 0, f"{where}: {new} graphs compiled after the first step (a size that follows the routing?)"


def train_step(model, opt, ids, labels, mask, weight=1.0, padding=None):
    """`weight`: the LM loss's token weight (`token_loss_weight`); the balance term, a mean
    over sequences, is not token-weighted (as in `train.loop.train_step`)."""
    opt.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, loss_mask=mask, padding_mask=padding)
    (out.lm_loss * weight + (out.loss - out.lm_loss)).backward()
    return out


def rank_slice(mesh, *tensors):
    """This rank's part of global-batch tensors: its DP rows, its CP chunks of each sequence."""
    per_rank = GLOBAL_BATCH // mesh.dp_size
    rows = slice(mesh.dp_rank * per_rank, (mesh.dp_rank + 1) * per_rank)
    return [cp_shard(t[rows], mesh.cp_rank, mesh.cp_size) for t in tensors]


def compare_with_single_process(
    rank: int,
    world_size: int,
    parallel_kw: dict,
    model_kw: dict | None = None,
    steps: int = 3,
    seq: int = SEQ,
    expert_bias: list[float] | None = None,
    final_state: dict | None = None,
    padded: bool = False,
    compile: bool = False,
):
    """`expert_bias`: every router's initial bias (steers the routing: experts with a lower
    bias than the highest must then receive no token). `final_state`: filled with the
    parallel model's gathered parameters and buffers after the last step. `padded`: two rows
    are padded shorter samples (`pad_rows`), their padding masked out of expert balancing;
    the expert counts (summed over the ranks) are compared too. `compile`: the parallel model
    is compiled as `train.compile` compiles it (`train.loop.compile_model`), and after the
    first step no graph is compiled again; the reference stays eager."""
    torch.manual_seed(0)
    reference = Nano3ForCausalLM(tiny_config(**(model_kw or {})))
    if expert_bias is not None:
        for moe in reference.moe_layers():
            moe.router.expert_bias.copy_(torch.tensor(expert_bias))
    model = copy.deepcopy(reference)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)

    dims = ParallelDims.from_config(ParallelismConfig(**parallel_kw), world_size, model.config)
    mesh = build_mesh(dims, "cpu")
    parallelize(model, mesh)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    run = model
    if compile:
        from nemotron.train.loop import Parallel, compile_model

        run = compile_model(model, Parallel(mesh=mesh))

    for step in range(steps):
        ids, labels, mask = batch(step, seq)
        padding = None
        if padded:
            ids, labels, mask, padding = pad_rows(ids, labels, mask)
        ref_out = train_step(reference, ref_opt, ids, labels, mask, padding=padding)
        ref_grads = full_grads(reference)
        ref_counts = [moe.router.tokens_per_expert.clone() for moe in reference.moe_layers()]
        if expert_bias is not None:
            idle = torch.tensor(expert_bias) < max(expert_bias)
            for moe in reference.moe_layers():
                assert not moe.router.tokens_per_expert[idle].any(), "an idle expert received tokens"
        ref_opt.step()
        update_expert_biases(reference.moe_layers(), BIAS_RATE)

        local_ids, local_labels, local_mask = rank_slice(mesh, ids, labels, mask)
        local_padding = rank_slice(mesh, padding)[0] if padded else None
        weight = token_loss_weight(local_mask, mesh)
        out = train_step(run, opt, local_ids, local_labels, local_mask, weight, local_padding)
        if padded:  # every rank routed different tokens: their counts add up to one process's
            for layer, (ref_count, moe) in enumerate(zip(ref_counts, model.moe_layers())):
                count = moe.router.tokens_per_expert.clone()
                dist.all_reduce(count, group=mesh.balancing_group)
                torch.testing.assert_close(count, ref_count, msg=lambda m: f"expert counts, MoE {layer}: {m}")
        lm = out.lm_loss.detach() * local_mask.sum()
        pair = torch.stack([lm, local_mask.sum()])
        dist.all_reduce(pair, group=mesh.loss_group)
        torch.testing.assert_close(pair[0] / pair[1], ref_out.lm_loss.detach(), rtol=1e-5, atol=1e-6)
        # the sequence balance term, a mean over sequences: each rank's over its own samples
        # (whole sequences, gathered over TP / CP), averaged over the ranks holding different
        # samples and chunks (DP x CP; CP peers compute the same value)
        # the sequence balance loss, a mean over sequences: each rank's over its own samples
        # (whole sequences, gathered over TP / CP), averaged over the ranks holding different
        # samples and chunks (DP x CP; CP peers compute the same value)
        balance = out.aux_loss.detach().clone()
        dist.all_reduce(balance, group=mesh.loss_group)
        torch.testing.assert_close(
            balance / mesh.loss_group_size, ref_out.aux_loss.detach(), rtol=1e-5, atol=1e-7
        )
        grads = full_grads(model)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), float("inf"))
        norm = clip_grad_norm_(model.parameters(), float("inf"))
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=1e-7)
        opt.step()
        update_expert_biases(model.moe_layers(), BIAS_RATE, mesh.balancing_group)
        for ref_moe, moe in zip(reference.moe_layers(), model.moe_layers()):
            torch.testing.assert_close(moe.router.expert_bias, ref_moe.router.expert_bias)
        # after the step, every parameter (gathered) and expert bias, tensor by tensor
        assert_same_tensors(full_params(model), full_params(reference), f"step {step}", rtol=1e-5, atol=1e-6)
        if compile and step == 0:
            warm = compiled_graphs()
        elif compile:
            assert_no_new_graphs(warm, f"step {step}")
    if final_state is not None:
        final_state.update(full_params(model))
    return float(ref_out.lm_loss)


def meta_init_matches_single_device(rank: int, world_size: int, parallel_kw: dict):
    """Build on meta, parallelize, to_empty + reset_parameters: every rank's shards equal the
    single-device reset_parameters() weights; then one bf16 mixed-precision step runs."""
    cfg = tiny_config()
    with torch.device("meta"):
        reference = Nano3ForCausalLM(cfg)
    reference.to_empty(device="cpu")
    torch.manual_seed(7)
    reference.reset_parameters()

    with torch.device("meta"):
        model = Nano3ForCausalLM(cfg)
    dims = ParallelDims.from_config(ParallelismConfig(**parallel_kw), world_size, cfg)
    mesh = build_mesh(dims, "cpu")
    parallelize(model, mesh, ParallelismConfig(**parallel_kw), mixed_precision=True)
    model.to_empty(device="cpu")
    torch.manual_seed(7)
    model.reset_parameters()
    ref_state = dict(reference.named_parameters()) | dict(reference.named_buffers())
    for name, value in list(model.named_parameters()) + list(model.named_buffers()):
        full = value.full_tensor() if isinstance(value, DTensor) else value
        torch.testing.assert_close(full, ref_state[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, labels, mask = batch(0)
    per_rank = GLOBAL_BATCH // dims.dp
    sl = slice(mesh.dp_rank * per_rank, (mesh.dp_rank + 1) * per_rank)
    out = train_step(model, opt, ids[sl], labels[sl], mask[sl])
    ref_loss = reference(ids, labels=labels, loss_mask=mask).lm_loss
    assert abs(float(out.lm_loss) - float(ref_loss)) < 0.05  # bf16 compute
    for p in model.parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32  # fp32 master + grads
        assert torch.isfinite(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).all()
    before = clip_grad_norm_(model.parameters(), max_norm=0.01)
    after = clip_grad_norm_(model.parameters(), max_norm=float("inf"))
    assert float(before) > 0.02 and abs(float(after) - 0.01) < 1e-4
    opt.step()
    return float(out.lm_loss)
