"""Context parallelism: forward outputs and gradients under CP 2 and 4 equal the single-rank
computation on the same sequence, for attention, Mamba-2 (conv halo and SSD state passing,
with CP chunk boundaries inside SSD chunks), the whole model (alone and with DP / EP / TP), and
a CP checkpoint resumes under CP 1."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from nemotron.distributed import ParallelDims, ParallelismConfig, build_mesh, parallelize
from nemotron.distributed.context_parallel import ContextParallel, ContextParallelError, cp_shard, cp_unshard
from nemotron.distributed.utils import token_loss_weight
from nemotron.models.nano3 import Nano3ForCausalLM
from nemotron.models.nano3.attention import Attention
from nemotron.models.nano3.mamba2 import Mamba2Mixer

from ._spawn import run_distributed
from .harness import (
    assert_same_tensors,
    compare_with_single_process,
    full_state,
    rank_slice,
    tensors,
    tiny_config,
    train_step,
)

CP_SEQ = 24  # CP 4: 8 chunks of 3 tokens (= the conv halo); Mamba chunk size 4 or 5 below


@pytest.mark.parametrize("cp_size", [1, 2, 3, 4])
def test_cp_shard_unshard_round_trip(cp_size):
    x = torch.arange(2 * 24 * 3).view(2, 24, 3)
    parts = [cp_shard(x, r, cp_size) for r in range(cp_size)]
    assert torch.equal(cp_unshard(parts), x)
    if cp_size == 2:  # rank 0: chunks 0 and 3; rank 1: chunks 1 and 2 (of 6 tokens)
        assert parts[0][0, :, 0].tolist() == [3 * i for i in [*range(0, 6), *range(18, 24)]]
        assert parts[1][0, :, 0].tolist() == [3 * i for i in range(6, 18)]
    y = x.transpose(0, 1).contiguous()  # the sequence on dim 0
    assert torch.equal(cp_unshard([cp_shard(y, r, cp_size, dim=0) for r in range(cp_size)], dim=0), y)


def test_cp_shard_rejects_indivisible_length():
    with pytest.raises(ContextParallelError, match="not divisible by 2 \\* context_parallel_size"):
        cp_shard(torch.zeros(1, 10), 0, 4)


def _check_module(module: torch.nn.Module, cp: ContextParallel, hidden: int, seq: int) -> None:
    """Outputs, input gradients and parameter gradients (summed over CP) of `module` on this
    rank's chunks equal the single-rank ones on the whole sequence."""
    torch.manual_seed(11)
    x = torch.randn(2, seq, hidden)
    upstream = torch.randn(2, seq, hidden)
    reference = copy.deepcopy(module)
    x_ref = x.clone().requires_grad_()
    out_ref = reference(x_ref)
    (out_ref * upstream).sum().backward()

    module.context_parallel = cp
    x_local = cp_shard(x, cp.rank, cp.size).requires_grad_()
    out = module(x_local)
    (out * cp_shard(upstream, cp.rank, cp.size)).sum().backward()
    torch.testing.assert_close(out, cp_shard(out_ref, cp.rank, cp.size), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_local.grad, cp_shard(x_ref.grad, cp.rank, cp.size), rtol=1e-4, atol=1e-5)
    ref_grads = dict(reference.named_parameters())
    for name, p in module.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=cp.group)  # each CP rank holds part of the gradient
        torch.testing.assert_close(
            grad,
            ref_grads[name].grad,
            rtol=1e-4,
            atol=1e-5,
            msg=lambda m: f"{type(module).__name__}.{name}: {m}",
        )


def _modules(rank, world_size):
    cp = ContextParallel(dist.group.WORLD)
    cfg = tiny_config()
    torch.manual_seed(0)
    _check_module(Attention(cfg), cp, cfg.hidden_size, CP_SEQ)
    # SSD chunks of 4 and 5: CP chunk boundaries (every 24 / (2 CP) tokens) land mid-chunk
    for chunk_size in (4, 5):
        mixer = Mamba2Mixer(tiny_config(mamba_chunk_size=chunk_size))
        with torch.no_grad():  # larger decays and dt than at init, so states carry far
            mixer.A_log.uniform_(-2.0, 0.0)
            mixer.dt_bias.uniform_(0.0, 1.0)
        _check_module(mixer, cp, cfg.hidden_size, CP_SEQ)
    # the conv halo needs chunks of at least kernel-1 tokens
    mixer = Mamba2Mixer(cfg)
    mixer.context_parallel = cp
    with pytest.raises(ContextParallelError, match="shorter than the conv1d context"):
        mixer(torch.randn(1, 4, cfg.hidden_size))
    return True


CP = dict(context_parallel_size=2)
LAYOUTS_2 = {
    "cp2": (CP, dict(moe_seq_aux_loss_coeff=0.1)),  # a large balance loss: gathered over CP
    "cp2-ep2": (dict(CP, expert_model_parallel_size=2), None),
    # padded rows: the padding mask's CP chunks, gathered with the scores for the balance loss
    "cp2-padded": (CP, dict(moe_seq_aux_loss_coeff=0.1), dict(padded=True)),
}
LAYOUTS_4 = {
    "cp4": (dict(context_parallel_size=4), dict(moe_seq_aux_loss_coeff=0.1)),
    "dp2-cp2": (CP, None),
    "cp2-tp2-ep2": (
        dict(CP, tensor_model_parallel_size=2, sequence_parallel=True, expert_model_parallel_size=2),
        dict(moe_seq_aux_loss_coeff=0.1),
    ),
}


def _modules_then_model_layouts(rank, world_size, layouts):
    """One launch per world size (process start-up dominates): first the modules with CP =
    world size, then the whole model under each layout."""
    from nemotron.distributed import tensor_parallel

    _modules(rank, world_size)

    # the vocab-parallel loss in several recomputed pieces (6 here under TP2 x CP2)
    tensor_parallel.LOSS_CHUNK_TOKENS = 8
    losses = {}
    for name, (parallel_kw, model_kw, *extra) in layouts.items():
        try:
            losses[name] = compare_with_single_process(
                rank, world_size, parallel_kw, model_kw, steps=2, seq=CP_SEQ, **(extra[0] if extra else {})
            )
        except AssertionError as err:
            raise AssertionError(f"layout {name}: {err}") from err
    return losses


@pytest.mark.parametrize("world_size,layouts", [(2, LAYOUTS_2), (4, LAYOUTS_4)], ids=["cp2", "cp4"])
def test_modules_and_whole_model_match_single_process(world_size, layouts):
    """Attention and Mamba-2 with CP = world size, then the whole model under each layout."""
    results = run_distributed(_modules_then_model_layouts, world_size, layouts)
    assert set(results[0]) == set(layouts) and all(r == results[0] for r in results)


# -- checkpoints --------------------------------------------------------------------------------


def _build(world_size: int, cp: int, seed: int):
    torch.manual_seed(seed)
    model = Nano3ForCausalLM(tiny_config())
    dims = ParallelDims.from_config(ParallelismConfig(context_parallel_size=cp), world_size, model.config)
    mesh = build_mesh(dims, "cpu")
    parallelize(model, mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2), mesh


def _step(model, opt, mesh, step: int) -> float:
    from .harness import batch

    ids, labels, mask = rank_slice(mesh, *batch(step, CP_SEQ))
    out = train_step(model, opt, ids, labels, mask, token_loss_weight(mask, mesh))
    opt.step()
    pair = torch.stack([out.lm_loss.detach() * mask.sum(), mask.sum()])
    if mesh.loss_group_size > 1:
        dist.all_reduce(pair, group=mesh.loss_group)
    return float(pair[0] / pair[1])


def _save_cp(rank, world_size, ckpt_dir):
    model, opt, mesh = _build(world_size, cp=world_size, seed=0)
    _step(model, opt, mesh, 0)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt_dir)
    saved = full_state(model, opt)
    return [_step(model, opt, mesh, 1 + i) for i in range(2)], saved, full_state(model, opt)


def _resume(rank, world_size, ckpt_dir):
    model, opt, mesh = _build(world_size, cp=1, seed=123)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loaded = full_state(model, opt)
    return [_step(model, opt, mesh, 1 + i) for i in range(2)], loaded, full_state(model, opt)


def test_cp2_checkpoint_resumes_under_cp1(tmp_path):
    """Every parameter, expert bias and AdamW state tensor loads as saved; the next losses and
    the parameters after them are those of the CP2 run."""
    ckpt = str(tmp_path / "ckpt")
    expected, saved, final = run_distributed(_save_cp, 2, ckpt)[0]
    resumed, loaded, resumed_final = run_distributed(_resume, 1, ckpt)[0]
    assert_same_tensors(tensors(loaded), tensors(saved), "loaded", rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert_same_tensors(tensors(resumed_final), tensors(final), "after 2 steps", rtol=1e-5, atol=1e-6)
