"""`train.compile` under tensor and pipeline parallelism: each block compiled in place, a MoE
block by its parts of fixed shape (`train.loop.compile_model`), 2 steps against the eager single
process on the same global batch: losses, gradient norm, every parameter's gradient (float32:
within the eager layouts' tolerances, rtol 1e-4 / atol 1e-6 per gradient element; Inductor's
fused float32 kernels differ from eager by rounding only), expert biases and parameters after
each step; no graph compiled in the second step, whose tokens take other experts (the harnesses
count Dynamo's graphs). The checkpoint names are the single-device model's: nothing of the
compile appears in them."""

import pytest

from ._spawn import run_distributed
from .harness import compare_with_single_process
from .pipeline_harness import compare_pipeline_with_single_process

TP = dict(tensor_model_parallel_size=2, sequence_parallel=True)


def _state_dict_names(rank, world_size):
    """A TP2 model whose blocks are compiled keeps the single-device model's state-dict keys."""
    import torch
    from models.tiny import tiny_config

    from nemotron.distributed import ParallelDims, ParallelismConfig, build_mesh, parallelize
    from nemotron.models.nano3 import Nano3ForCausalLM
    from nemotron.models.nano3.moe import MoE
    from nemotron.train.loop import Parallel, compile_model

    torch.manual_seed(0)
    want = list(Nano3ForCausalLM(tiny_config()).state_dict())
    model = Nano3ForCausalLM(tiny_config())
    mesh = build_mesh(ParallelDims.from_config(ParallelismConfig(**TP), world_size, model.config), "cpu")
    parallelize(model, mesh)
    assert compile_model(model, Parallel(mesh=mesh)) is model
    for block in model.backbone.layers.values():
        if isinstance(block.mixer, MoE):  # its parts of fixed shape; the routed path eager
            parts = [block.norm, block.mixer.shared_experts]
            eager = [block, block.mixer, block.mixer.router, block.mixer.experts]
        else:
            parts, eager = [block], []
        assert all(part._compiled_call_impl is not None for part in parts), block.kind
        assert all(module._compiled_call_impl is None for module in eager), block.kind
    assert list(model.state_dict()) == want


def _run_layouts(rank, world_size, layouts):
    out = {}
    for name, run in layouts.items():
        try:
            out[name] = run(rank, world_size)
        except AssertionError as err:
            raise AssertionError(f"layout {name}: {err}") from err
    return out


def _tp2(rank, world_size):
    _state_dict_names(rank, world_size)
    return compare_with_single_process(rank, world_size, TP, steps=2, compile=True)


def _pp2_recompute(rank, world_size):
    """The stages' blocks compiled around their activation checkpoints, a MoE block's norm and
    shared expert inside its (the routers count each token once: the expert biases are
    compared), evaluation through the schedule too."""
    pp = dict(pipeline_model_parallel_size=2, pipeline_schedule="1F1B")
    return compare_pipeline_with_single_process(rank, world_size, pp, steps=2, recompute=True, compile=True)[
        0
    ]


def _tp2_ep2(rank, world_size):
    """EP over the TP ranks: the all-to-all dispatcher inside the compiled MoE blocks."""
    return compare_with_single_process(
        rank, world_size, dict(TP, expert_model_parallel_size=2), steps=2, compile=True
    )


# one launch: the TP layouts share the compiled Mamba, attention and MLP blocks
LAYOUTS = {"tp2": _tp2, "tp2-ep2": _tp2_ep2, "pp2-1f1b-recompute": _pp2_recompute}


@pytest.mark.slow  # Inductor compiles every block kind: 32 s / 186 s on 2 busy cores (warm, cold cache)
def test_compiled_blocks_under_tensor_expert_and_pipeline_parallel_match_one_eager_process():
    results = run_distributed(_run_layouts, 2, LAYOUTS)
    assert set(results[0]) == set(LAYOUTS) and results[0] == results[1]
