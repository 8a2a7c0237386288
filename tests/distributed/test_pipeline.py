"""Pipeline parallelism (torch.distributed.pipelining) against one process: for every layout and
schedule, 3 steps of the loop's `train_step` give the single process's loss (with the MoE
balance term), LM loss, gradient norm, every parameter's gradient (float32) and expert biases.
Layouts of one world size share a launch (process start-up dominates on CPU)."""

import pytest

from nemotron.train.fp8 import Fp8Config

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
    # micro-batches of 2 mixing 8 and 4 tokens, right-padded: each stage's MoE blocks get the
    # padding mask (kept out of their balancing, as one process does)
    "pp2-1f1b-padded-micro-batches": (dict(PP2, pipeline_schedule="1F1B"), 8, dict(short=4, pairs=True)),
    # a manual split of 1 and 5 blocks: the first stage the embeddings and one Mamba block,
    # the last every MoE layer and the LM head
    "pp2-1f1b-manual-1-5": (dict(PP2, pipeline_schedule="1F1B", pipeline_blocks_per_stage=[1, 5]), 8),
    # micro-batch counts the schedules refuse or that leave stages idle: 5 under Interleaved1F1B
    # (not a multiple of its 2 rounds: run as 4 + 1), 2 under ZBV (fewer than its 4 stages)
    "pp2-interleaved-1f1b-5-micro-batches": (
        dict(PP2, pipeline_schedule="Interleaved1F1B"),
        8,
        dict(global_batch_size=5),
    ),
    "pp2-zbv-2-micro-batches": (dict(PP2, pipeline_schedule="ZBVZeroBubble"), 8, dict(global_batch_size=2)),
    # per-block activation recomputation inside the stages
    "pp2-interleaved-1f1b-recompute": (
        dict(PP2, pipeline_schedule="Interleaved1F1B"),
        8,
        dict(recompute=True),
    ),
}
# FP8 (emulated): the routed experts in fp32 steps, then the experts and the LM head (its FP8
# products need bf16 autocast) with the quantized weights reused within each step across the
# schedule's micro-batches; every stage converts its own blocks, the last its LM head.
FP8_LAYOUTS_2 = {
    "pp2-1f1b-fp8-experts": (
        dict(PP2, pipeline_schedule="1F1B"),
        8,
        dict(fp8=Fp8Config(enabled=True, layers=["experts"])),
    ),
    "pp2-interleaved-1f1b-fp8-experts-lm-head-reused": (
        dict(PP2, pipeline_schedule="Interleaved1F1B"),
        8,
        dict(fp8=Fp8Config(enabled=True, layers=["experts", "lm_head"], reuse_weights=True)),
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
    # mixed lengths that differ between the DP ranks (rank 0: 8, 8 tokens; rank 1: 4, 8): the
    # runs are cut where either rank's length changes (1 + 1 micro-batches on both), so their
    # FSDP reductions and EP all-to-alls meet (runs by each rank's own lengths hung)
    "pp2-dp2-1f1b-mixed-lengths-differ-by-rank": (
        dict(PP2, pipeline_schedule="1F1B"),
        8,
        dict(short=4, global_batch_size=4),
    ),
    "pp2-dp2-ep2-interleaved-1f1b-mixed-lengths-differ-by-rank": (
        dict(PP2, expert_model_parallel_size=2, pipeline_schedule="Interleaved1F1B"),
        8,
        dict(short=4, global_batch_size=4),
    ),
    # PP4 with two stages per rank in a V (8 stages of one block each: 8-block pattern), 3
    # micro-batches (fewer than the ranks), clipping active: the norm over all 4 ranks' stages
    "pp4-zbv-zero-bubble-3-micro-batches-clipped": (
        dict(pipeline_model_parallel_size=4, pipeline_schedule="ZBVZeroBubble"),
        8,
        dict(model_kw=dict(hybrid_pattern="ME*EM-ME", num_layers=8), global_batch_size=3, grad_clip=0.1),
    ),
    # CP2: 16 tokens = 4 chunks of 4 (a chunk must hold the conv1d's 3-token context)
    "pp2-cp2-1f1b": (dict(PP2, context_parallel_size=2, pipeline_schedule="1F1B"), 16),
    "pp2-cp2-interleaved-1f1b": (dict(PP2, context_parallel_size=2, pipeline_schedule="Interleaved1F1B"), 16),
}
# PP2 x TP2 + sequence parallel: the stages exchange each TP rank's sequence shard; the first
# stage's vocab-parallel embeddings and the last stage's vocab-parallel LM head + loss are the
# TP plans of a whole model. A 7-block pattern puts Mamba, attention and MoE blocks on both
# stages under 1F1B (M*E- | M*E) and on both ranks under ZBV (rank 0: M* + E, the embeddings
# and the LM head; rank 1: E- + M*).
TP2 = dict(tensor_model_parallel_size=2, sequence_parallel=True)
BOTH_STAGES = dict(model_kw=dict(hybrid_pattern="M*E-M*E", num_layers=7))
LAYOUTS_4_TP = {
    # with gradient clipping: the norm over DTensor gradients of both stages scales them
    "pp2-tp2-1f1b-clipped": (dict(PP2, **TP2, pipeline_schedule="1F1B"), 8, dict(BOTH_STAGES, grad_clip=0.1)),
    "pp2-tp2-zbv-zero-bubble": (dict(PP2, **TP2, pipeline_schedule="ZBVZeroBubble"), 8, BOTH_STAGES),
    # EP2 over a stage's two TP ranks (each routes its own sequence shard)
    "pp2-tp2-ep2-interleaved-zero-bubble": (
        dict(PP2, **TP2, expert_model_parallel_size=2, pipeline_schedule="InterleavedZeroBubble"),
        8,
        BOTH_STAGES,
    ),
}

# The long-context recipe's composition (TP8 CP8 EP8 PP4) in miniature: every stage is a CP2 x
# TP2 group (EP2 over it), sending each rank's CP-chunk, TP-shard of the hidden states.
# 16 tokens: 2*CP*TP = 8 pieces of 2 (the Mamba mixer gathers TP before its CP chunk of 4).
LAYOUTS_8 = {
    "pp2-cp2-tp2-ep2-1f1b": (
        dict(PP2, **TP2, context_parallel_size=2, expert_model_parallel_size=2, pipeline_schedule="1F1B"),
        16,
        BOTH_STAGES,
    )
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

    for layout, (_, _, *extra) in layouts.items():
        model_kw = extra[0].get("model_kw") if extra else None
        names = {n for n, _ in Nano3ForCausalLM(make_config({}, model_kw).model.arch()).named_parameters()}
        losses = [r[layout][0] for r in results]
        assert all(loss == losses[0] for loss in losses), layout  # every rank logs the same
        trained = set().union(*(r[layout][1] for r in results))
        assert trained == names, f"{layout}: parameters no rank trained: {names - trained}"
        assert torch.tensor(losses[0]).isfinite().all()


@pytest.mark.slow  # every schedule against one process: ~30 s on 2 cores
def test_pipeline_schedules_on_2_ranks():
    _check(run_distributed(_run_layouts, 2, LAYOUTS_2), LAYOUTS_2)


def test_pipeline_with_fp8_on_2_ranks():
    _check(run_distributed(_run_layouts, 2, FP8_LAYOUTS_2), FP8_LAYOUTS_2)


@pytest.mark.slow  # ~55 s on 2 cores; 2-rank schedules stay in the default run
def test_pipeline_with_data_expert_and_context_parallel_on_4_ranks():
    _check(run_distributed(_run_layouts, 4, LAYOUTS_4), LAYOUTS_4)


@pytest.mark.slow  # ~35 s on 2 cores
def test_pipeline_with_tensor_and_sequence_parallel_on_4_ranks():
    _check(run_distributed(_run_layouts, 4, LAYOUTS_4_TP), LAYOUTS_4_TP)


@pytest.mark.slow  # 8 processes: ~35 s on 2 cores
def test_pipeline_with_context_tensor_and_expert_parallel_on_8_ranks():
    _check(run_distributed(_run_layouts, 8, LAYOUTS_8), LAYOUTS_8)
