"""Pipeline parallelism (torch.distributed.pipelining) against one process: for every layout and
schedule, 3 steps of the loop's `train_step` give the single process's loss (with the MoE
balance term), LM loss, gradient norm, every parameter's gradient (float32) and expert biases.
Layouts of one world size share a launch (process start-up dominates on CPU)."""

from ._spawn import run_distributed
from .pipeline_harness import compare_pipeline_with_single_process, make_config

PP2 = dict(pipeline_model_parallel_size=2)

LAYOUTS_2 = {  # (parallel sizes, sequence length)
    "pp2-1f1b": (dict(PP2, pipeline_schedule="1F1B"), 8),
    "pp2-gpipe": (dict(PP2, pipeline_schedule="GPipe"), 8),
    "pp2-interleaved-1f1b": (dict(PP2, pipeline_schedule="Interleaved1F1B"), 8),
    "pp2-zbv-zero-bubble": (dict(PP2, pipeline_schedule="ZBVZeroBubble"), 8),
    # 8- and 4-token samples in one step (the long-context mix): one schedule run per length
    "pp2-1f1b-mixed-lengths": (dict(PP2, pipeline_schedule="1F1B"), 8, dict(short=4)),
    # per-block activation recomputation inside the stages
    "pp2-interleaved-1f1b-recompute": (
        dict(PP2, pipeline_schedule="Interleaved1F1B"),
        8,
        dict(recompute=True),
    ),
}
LAYOUTS_4 = {
    "pp2-dp2-1f1b": (dict(PP2, pipeline_schedule="1F1B"), 8),
    "pp2-dp2-interleaved-1f1b": (dict(PP2, pipeline_schedule="Interleaved1F1B"), 8),
    # EP2 inside each stage (its 2 ranks are DP2): all-to-all dispatch within a stage
    "pp2-dp2-ep2-1f1b": (dict(PP2, expert_model_parallel_size=2, pipeline_schedule="1F1B"), 8),
    "pp2-dp2-ep2-interleaved-zero-bubble": (
        dict(PP2, expert_model_parallel_size=2, pipeline_schedule="InterleavedZeroBubble"),
        8,
    ),
    # CP2: 16 tokens = 4 chunks of 4 (a chunk must hold the conv1d's 3-token context)
    "pp2-cp2-1f1b": (dict(PP2, context_parallel_size=2, pipeline_schedule="1F1B"), 16),
    "pp2-cp2-interleaved-1f1b": (dict(PP2, context_parallel_size=2, pipeline_schedule="Interleaved1F1B"), 16),
}


def _run_layouts(rank, world_size, layouts):
    out = {}
    for name, (parallel_kw, seq, *extra) in layouts.items():
        try:
            out[name] = compare_pipeline_with_single_process(
                rank, world_size, parallel_kw, seq=seq, **(extra[0] if extra else {})
            )
        except AssertionError as err:
            raise AssertionError(f"layout {name}: {err}") from err
    return out


def _check(results, layouts):
    import torch

    from nemotron.models.nano3 import Nano3ForCausalLM

    names = {n for n, _ in Nano3ForCausalLM(make_config({}).model.arch()).named_parameters()}
    for layout in layouts:
        losses = [r[layout][0] for r in results]
        assert all(loss == losses[0] for loss in losses), layout  # every rank logs the same
        trained = set().union(*(r[layout][1] for r in results))
        assert trained == names, f"{layout}: parameters no rank trained: {names - trained}"
        assert torch.tensor(losses[0]).isfinite().all()


def test_pipeline_schedules_on_2_ranks():
    _check(run_distributed(_run_layouts, 2, LAYOUTS_2), LAYOUTS_2)


def test_pipeline_with_data_expert_and_context_parallel_on_4_ranks():
    _check(run_distributed(_run_layouts, 4, LAYOUTS_4), LAYOUTS_4)
