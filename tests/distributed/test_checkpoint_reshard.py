"""Save under one layout (2 ranks, EP2), resume under others (4 ranks EP1; 1 process; 2 ranks
TP2 EP2), through DCP and DTensor state dicts: every parameter, expert bias and AdamW state
tensor loads as saved (gathered, per tensor), and training continues with the same losses and
the same parameters."""

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from models.tiny import tiny_config
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from nemotron.distributed import ParallelDims, ParallelismConfig, build_mesh, parallelize
from nemotron.distributed.utils import token_loss_weight
from nemotron.models.nano3 import Nano3ForCausalLM
from nemotron.train.balancing import update_expert_biases

from ._spawn import run_distributed
from .harness import GLOBAL_BATCH, assert_same_tensors, batch, full_state, tensors, train_step

SAVED_STEPS, RESUMED_STEPS = 2, 2


def _build(world_size: int, ep: int, seed: int, tp: int = 1):
    torch.manual_seed(seed)
    model = Nano3ForCausalLM(tiny_config())
    parallel = ParallelismConfig(
        expert_model_parallel_size=ep, tensor_model_parallel_size=tp, sequence_parallel=tp > 1
    )
    dims = ParallelDims.from_config(parallel, world_size, model.config)
    mesh = build_mesh(dims, "cpu")
    parallelize(model, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, opt, mesh


def _step(model, opt, mesh, step: int) -> float:
    ids, labels, mask = batch(step)
    per_rank = GLOBAL_BATCH // mesh.dp_size
    sl = slice(mesh.dp_rank * per_rank, (mesh.dp_rank + 1) * per_rank)
    out = train_step(model, opt, ids[sl], labels[sl], mask[sl], token_loss_weight(mask[sl], mesh))
    opt.step()
    update_expert_biases(model.moe_layers(), 1e-2, mesh.balancing_group)
    pair = torch.stack([out.lm_loss.detach() * mask[sl].sum(), mask[sl].sum()])
    dist.all_reduce(pair, group=mesh.loss_group)
    return float(pair[0] / pair[1])


def _save_then_continue(rank, world_size, ckpt_dir):
    model, opt, mesh = _build(world_size, ep=2, seed=0)
    for step in range(SAVED_STEPS):
        _step(model, opt, mesh, step)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt_dir)
    saved = full_state(model, opt)
    losses = [_step(model, opt, mesh, SAVED_STEPS + i) for i in range(RESUMED_STEPS)]
    return losses, saved, full_state(model, opt)


def _resume(rank, world_size, ckpt_dir, ep, tp=1):
    model, opt, mesh = _build(world_size, ep=ep, seed=123, tp=tp)  # other init: all is loaded
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=ckpt_dir)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loaded = full_state(model, opt)
    losses = [_step(model, opt, mesh, SAVED_STEPS + i) for i in range(RESUMED_STEPS)]
    return losses, loaded, full_state(model, opt)


@pytest.mark.slow  # 6 ranks in turn: ~15 s
def test_save_ep2_on_2_ranks_resume_ep1_on_4_ranks(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    expected, saved, final = run_distributed(_save_then_continue, 2, ckpt)[0]
    saved, final = tensors(saved), tensors(final)
    assert any(".expert_bias" in name and value.any() for name, value in saved.items())
    assert any(name.endswith(".exp_avg_sq") for name in saved)
    for layout, args in {
        "4 ranks, EP1": (4, ckpt, 1),
        "one process holding every expert": (1, ckpt, 1),
        # TP2 + SP with EP2 on 2 ranks (DP 1), weights and AdamW state resharded
        "2 ranks, TP2 EP2": (2, ckpt, 2, 2),
    }.items():
        losses, loaded, resumed_final = run_distributed(_resume, *args)[0]
        loaded, resumed_final = tensors(loaded), tensors(resumed_final)
        assert_same_tensors(loaded, saved, f"{layout}, loaded", rtol=0, atol=0)
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(expected), rtol=1e-5, atol=1e-6, msg=layout
        )
        assert_same_tensors(
            resumed_final, final, f"{layout}, after {RESUMED_STEPS} steps", rtol=1e-5, atol=1e-6
        )
