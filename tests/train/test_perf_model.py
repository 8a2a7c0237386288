"""The performance and memory model (`nemotron.train.perf_model`): parameter counts per FSDP unit
against the real `parallelize` on a fake process group, the calibration against every measured
multi-GPU run, the block times against the benchmark JSON, and the advice it gives."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemotron.models.nano3 import Nano3Config
from nemotron.train import perf_model as pm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

# rank 0's local element count per FSDP unit after the real parallelize, on a fake process group
FAKE_PG_COUNTS = r"""
import json, sys, torch, torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore
from nemotron.distributed import ParallelDims, ParallelismConfig, build_mesh, parallelize
from nemotron.models.nano3 import Nano3Config, Nano3ForCausalLM
cfg_kw, layouts = json.loads(sys.argv[1])
out = []
for world, tp, ep in layouts:
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    cfg = Nano3Config(**cfg_kw)
    parallel = ParallelismConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                 sequence_parallel=tp > 1)
    mesh = build_mesh(ParallelDims.from_config(parallel, world, cfg), "cpu")
    with torch.device("meta"):
        model = Nano3ForCausalLM(cfg)
    parallelize(model, mesh, parallel, mixed_precision=True)
    counts = {}
    for name, p in model.named_parameters():
        local = (p.to_local() if isinstance(p, DTensor) else p).numel()
        parts = name.split(".")
        if parts[0] == "backbone" and parts[1] == "layers":
            unit = "layers." + parts[2] + (".experts" if ".experts." in name and "shared" not in name else "")
        elif parts[0] == "backbone" and parts[1] == "embeddings":
            unit = "embeddings"
        else:
            unit = "root"
        # under TP, parameters FSDP2 sharded over the flattened DP x TP mesh are rank-local
        if tp > 1 and any(n.endswith("_tp") for n in p.device_mesh.mesh_dim_names):
            unit = "norm_f" if parts[1] == "norm_f" else "layers." + parts[2] + ".local"
        counts[unit] = counts.get(unit, 0) + local
    out.append(counts)
    dist.destroy_process_group()
print(json.dumps(out))
"""

SMALL = dict(
    hybrid_pattern="MEM*E",
    num_layers=5,
    hidden_size=256,
    vocab_size=1024,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    mamba_num_heads=8,
    mamba_head_dim=32,
    mamba_state_size=16,
    mamba_num_groups=8,
    num_experts=16,
    moe_top_k=2,
    moe_ffn_hidden_size=64,
    moe_shared_expert_hidden_size=128,
)


def test_parameter_counts_per_unit_match_the_real_sharding():
    layouts = [(4, 1, 1), (4, 1, 4), (8, 2, 4), (8, 8, 8), (16, 2, 8)]
    proc = subprocess.run(
        [sys.executable, "-c", FAKE_PG_COUNTS, json.dumps([SMALL, layouts])],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg = Nano3Config(**SMALL)
    for (world, tp, ep), real in zip(layouts, measured):
        units = {u.name: u.sharded for u in pm.fsdp_units(cfg, pm.Layout(world, tp=tp, ep=ep))}
        assert units == real, (
            world,
            tp,
            ep,
            {k: (units.get(k), real.get(k)) for k in set(units) | set(real) if units.get(k) != real.get(k)},
        )


def test_full_model_totals():
    cfg = Nano3Config()
    units = pm.fsdp_units(cfg, pm.Layout(1))
    assert sum(u.unsharded for u in units) == 31_577_937_344  # the model's parameter count
    # TP8 EP8 on 8 GPUs: 3.954B parameters per GPU (docs/parallelism.md; 3.962B while the norms
    # and routers were replicated over TP instead of sharded over DP x TP)
    local = sum(u.sharded for u in pm.fsdp_units(cfg, pm.Layout(8, tp=8, ep=8)))
    assert abs(local - 3.954e9) < 0.001e9


def test_block_times_are_the_benchmark_results():
    results = ROOT / "benchmarks" / "results" / "2026-11-29-h200"
    for key, (file, block, path) in pm.BLOCK_MS_SOURCES.items():
        rows = json.loads((results / file).read_text())["rows"]
        ms = next(r["ms"] for r in rows if r["block"] == block and r["path"] == path)
        assert pm.MEASURED_BLOCK_MS[key] == pytest.approx(ms, abs=5e-4), key


def test_every_multi_gpu_measurement_within_15_percent():
    from calibrate_plan import errors, load_rows

    rows = load_rows()
    multi = [r for r in rows if r.multi_gpu]
    assert len(multi) >= 15  # docs/benchmarks.md: 12 rows on 2 H200s, 3 on 4 (and any since)
    for row, (tps, mem) in zip(rows, errors(rows, pm.CALIBRATION)):
        assert abs(tps) <= 0.15, (row.name, "tokens/s", tps)
        assert abs(mem) <= 0.15, (row.name, "peak memory", mem)


def test_memory_accounting_of_unsharded_accumulation():
    """Accumulating unsharded: 12 bytes per sharded parameter (fp32 weight + AdamW) and 6 per
    unsharded one (bf16 weight + fp32 accumulated gradient), no sharded gradients yet."""
    cfg = Nano3Config(**SMALL)
    layout = pm.Layout(4, ep=4, micro_batch=1)
    shape = pm.RunShape(seq_length=1024, global_batch_size=16)
    plan = pm.estimate(cfg, layout, shape)
    units = pm.fsdp_units(cfg, layout)
    sharded = sum(u.sharded for u in units)
    unsharded = sum(u.unsharded for u in units)
    assert plan.grad_accumulation == 4
    assert plan.memory.weights == pytest.approx(4 * sharded / pm.GIB)
    assert plan.memory.optimizer == pytest.approx(8 * sharded / pm.GIB)
    assert plan.memory.fsdp_buffers == pytest.approx(6 * unsharded / pm.GIB)
    assert plan.memory.gradients == 0
    # resharding every micro-batch: sharded gradients accumulate in place instead
    resharded = pm.estimate(cfg, pm.Layout(4, ep=4, accumulate_unsharded=False), shape)
    assert resharded.memory.gradients == pytest.approx(4 * sharded / pm.GIB)
    assert resharded.step.fsdp > plan.step.fsdp


def test_recipe_layout_warns_and_a_faster_one_is_recommended():
    cfg, shape = Nano3Config(), pm.RunShape()
    recipe = pm.estimate(cfg, pm.Layout(8, tp=8, ep=8), shape)
    assert any("TP8" in w and "tensor_model_parallel_size=1" in w for w in recipe.warnings)
    best = pm.recommend(cfg, 8, shape)
    assert best and all(p.memory.fits for p in best)
    assert best[0].layout.tp == 1
    assert best[0].tokens_per_second_per_gpu > recipe.tokens_per_second_per_gpu
    # the whole model does not fit 2 GPUs with any layout, nor 4 without recomputation at mb 1
    assert not pm.estimate(cfg, pm.Layout(2, ep=2), shape).memory.fits
    assert not pm.estimate(cfg, pm.Layout(4, ep=4), shape).memory.fits
    assert pm.recommend(cfg, 2, shape) == []


def test_layout_errors_are_plan_errors():
    cfg = Nano3Config()
    with pytest.raises(pm.PlanError, match="not divisible"):
        pm.estimate(cfg, pm.Layout(12, tp=8), pm.RunShape())
    with pytest.raises(pm.PlanError, match="num_experts=128 is not divisible"):
        pm.estimate(cfg, pm.Layout(24, ep=3), pm.RunShape())


def test_smallest_world():
    assert pm.smallest_world(pm.Layout(1, tp=8, ep=8)) == 8
    assert pm.smallest_world(pm.Layout(1, tp=2, ep=8)) == 8
    assert pm.smallest_world(pm.Layout(1, tp=8, cp=8, pp=4, ep=8)) == 256


def test_loss_chunk_is_the_tensor_parallel_one():
    from nemotron.distributed.tensor_parallel import LOSS_CHUNK_TOKENS

    assert pm.LOSS_CHUNK_TOKENS == LOSS_CHUNK_TOKENS


def test_pipeline_stages_pace_and_bubble():
    """PP (implemented, with TP too): the slowest stage sets the pace, (PP-1) idle slots."""
    cfg, shape = Nano3Config(), pm.RunShape(global_batch_size=256)
    one = pm.estimate(cfg, pm.Layout(64, ep=8), shape)
    four = pm.estimate(cfg, pm.Layout(256, ep=8, pp=4), shape)
    assert four.implemented and any("PP4" in w for w in four.warnings)
    assert pm.estimate(cfg, pm.Layout(256, tp=2, ep=8, pp=4), shape).implemented
    assert four.grad_accumulation == one.grad_accumulation
    # a quarter of the blocks per stage (+ the head on the last), plus the bubble
    assert 0.25 * one.step.compute < four.step.compute < 0.4 * one.step.compute
    assert four.step.pipeline_bubble > 0


def test_pipeline_stages_are_trainings_split():
    """The model's stages are the blocks training puts on each stage (split by cost, the LM
    head's on the last), not an even count: Nano3 PP4 at 8192 is 14 / 14 / 15 / 9 blocks."""
    from nemotron.distributed.config import ParallelismConfig
    from nemotron.distributed.pipeline_split import split_stages

    cfg = Nano3Config()
    layout = pm.Layout(256, ep=8, pp=4)
    trained = split_stages(cfg, ParallelismConfig(pipeline_model_parallel_size=4), [(8192, 1.0)]).blocks
    assert [len(b) for b in trained] == [14, 14, 15, 9]
    for stage, blocks in enumerate(trained):
        modelled = {u.block for u in pm.stage_units(cfg, layout, stage, 8192) if u.block is not None}
        assert modelled == set(blocks), stage


def test_plan_checks_every_sample_length_as_pretrain_does():
    """A mixed-length sample that 2*CP*TP does not divide: `pretrain` refuses the run at start,
    so the plan must not call the layout one that fits (both name the key)."""
    from nemotron.cli.pretrain import check_layout
    from nemotron.config import ConfigError, PretrainConfig, load_config, resolve_config_path

    cfg = load_config(resolve_config_path("long_context", PretrainConfig), [], PretrainConfig)
    mixed = cfg.data.mixed_length_blends
    cfg.data.mixed_length_blends = [dataclasses.replace(mixed[0], seq_length=4000)]
    key = "data.mixed_length_blends[0].seq_length=4000 must be a positive multiple of 128"
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        check_layout(cfg, 256, "test")
    shape = pm.shape_from_config(cfg)
    assert shape.sample_lengths() == {
        "train.seq_length": 524288,
        "data.mixed_length_blends[0].seq_length": 4000,
    }
    with pytest.raises(pm.PlanError, match=key.replace("[", r"\[").replace("]", r"\]")):
        pm.estimate(cfg.model.arch(), pm.layout_from_config(cfg, 256), shape)
    # a layout that cuts sequences into 2*CP*TP = 32 pieces runs it
    assert pm.estimate(cfg.model.arch(), pm.Layout(256, tp=8, ep=8, cp=2, recompute=True), shape)


def test_layout_check_refuses_context_chunks_shorter_than_the_conv_context():
    """Sequences whose 2*CP chunks cannot hold the Mamba conv's context (kernel - 1 tokens) are
    refused before the job is submitted, naming the keys, as `pretrain` refuses them at its start
    (they used to pass every check and fail inside the first Mamba mixer at the first step)."""
    from nemotron.cli.pretrain import check_layout
    from nemotron.config import ConfigError, PretrainConfig, load_config, resolve_config_path

    overrides = ["model.context_parallel_size=4", "train.seq_length=16"]
    cfg = load_config(resolve_config_path("tiny", PretrainConfig), overrides, PretrainConfig)
    with pytest.raises(
        ConfigError,
        match=r"^test: 4 processes: train.seq_length=16 is too short for model.context_parallel_size=4: "
        r"its 2\*CP = 8 chunks of 2 tokens .* model.mamba_conv_kernel-1 = 3 tokens",
    ):
        check_layout(cfg, 4, "test")
    cfg.train.seq_length = 24  # chunks of 3
    check_layout(cfg, 4, "test")
    with pytest.raises(pm.PlanError, match=r"train.seq_length=16 is too short"):
        pm.validate_layout(
            cfg.model.arch(),
            pm.Layout(4, cp=4),
            dataclasses.replace(pm.shape_from_config(cfg), seq_length=16),
        )


SMALL_BLOCKS = {k: v for k, v in SMALL.items() if k not in ("hybrid_pattern", "num_layers")}


def _block_params(cfg: Nano3Config, blocks) -> int:
    import torch

    from nemotron.models.nano3 import Nano3ForCausalLM

    with torch.device("meta"):
        model = Nano3ForCausalLM(cfg)
    return sum(p.numel() for i in blocks for p in model.backbone.layers[str(i)].parameters())


def test_pipeline_memory_is_the_fullest_rank_even_a_middle_one():
    """Training's cost-balanced split of MMMEEEEEEMMM over 3 ranks puts the six MoE blocks (the
    parameters) on the middle rank: the plan's weights are that rank's, counted on the real
    model (one GPU per stage: nothing sharded), not the first or last stage's."""
    pattern = "MMMEEEEEEMMM"
    cfg = Nano3Config(hybrid_pattern=pattern, num_layers=len(pattern), **SMALL_BLOCKS)
    shape = pm.RunShape(seq_length=64, global_batch_size=1)
    layout = pm.Layout(3, pp=3)
    ranks = pm.rank_blocks(cfg, layout, shape)
    assert [r.blocks for r in ranks] == [(0, 1, 2, 3), (4, 5, 6, 7, 8, 9), (10, 11)]
    middle = _block_params(cfg, range(4, 10))
    assert middle == 3_238_168
    plan = pm.estimate(cfg, layout, shape)
    assert plan.memory.weights * pm.GIB == 4 * middle
    assert plan.memory.optimizer * pm.GIB == 8 * middle
    assert plan.memory.loss_buffers == 0  # the LM head's loss lives on the last rank


def test_pipeline_follows_the_recipes_manual_split_and_schedule():
    """model.pipeline_blocks_per_stage and the schedule are training's stages: the plan uses
    them (GPipe keeps every micro-batch's activations; 1F1B at most PP - rank)."""
    pattern = "MEEEM"
    cfg = Nano3Config(hybrid_pattern=pattern, num_layers=len(pattern), **SMALL_BLOCKS)
    shape = pm.RunShape(seq_length=4096, global_batch_size=8)
    manual = pm.Layout(3, pp=3, blocks_per_stage=(1, 3, 1))
    assert [r.blocks for r in pm.rank_blocks(cfg, manual, shape)] == [(0,), (1, 2, 3), (4,)]
    assert pm.estimate(cfg, manual, shape).memory.weights * pm.GIB == 4 * _block_params(cfg, range(1, 4))
    with pytest.raises(pm.PlanError, match="pipeline_blocks_per_stage"):
        pm.estimate(cfg, pm.Layout(3, pp=3, blocks_per_stage=(1, 1, 1)), shape)
    one_f_one_b = pm.estimate(cfg, pm.Layout(2, pp=2, recompute=False), shape)
    gpipe = pm.estimate(cfg, pm.Layout(2, pp=2, pipeline_schedule="GPipe"), shape)
    assert gpipe.grad_accumulation == 8
    assert gpipe.memory.activations > 3 * one_f_one_b.memory.activations


def test_mixed_lengths_count_each_micro_batch_and_token_at_its_own_length():
    """Half 512K-token, half 4K-token samples at micro-batch 1: the step computes each micro-batch
    at its own length (the mean of the two pure runs' compute), counts the real tokens (not
    48 x 512K) and the MFU from each sample's own FLOPs."""
    from nemotron.train import flops

    cfg = Nano3Config()
    long, short = 524288, 4096
    layout = pm.Layout(256, tp=8, ep=8, cp=8, recompute=True)
    mixed = pm.RunShape(seq_length=long, global_batch_size=48, mixed_lengths=((short, 1.0),))
    plan = pm.estimate(cfg, layout, mixed)
    pure = [pm.estimate(cfg, layout, pm.RunShape(seq_length=n, global_batch_size=48)) for n in (long, short)]
    assert plan.step.compute == pytest.approx((pure[0].step.compute + pure[1].step.compute) / 2)
    tokens = 24 * (long + short)
    assert plan.tokens_per_second_per_gpu == pytest.approx(tokens / plan.step.total / 256)
    model_flops = 24 * (
        long * flops.training_flops_per_token(cfg, long) + short * flops.training_flops_per_token(cfg, short)
    )
    assert plan.mfu == pytest.approx(model_flops / plan.step.total / 256 / flops.H200_BF16_PEAK_FLOPS)
    # memory: a micro-batch of the longest sample, as in the pure 512K run
    assert plan.memory.activations == pytest.approx(pure[0].memory.activations)
    # several samples per micro-batch are padded to the longest
    # pipeline stages: training's split at the mix of lengths
    from nemotron.distributed.config import ParallelismConfig
    from nemotron.distributed.pipeline_split import split_stages

    pp = pm.Layout(256, tp=8, ep=8, cp=2, pp=4)
    trained = split_stages(
        cfg, ParallelismConfig(pipeline_model_parallel_size=4), [(long, 0.5), (short, 0.5)]
    )
    assert [r.blocks for r in pm.rank_blocks(cfg, pp, mixed)] == [tuple(b) for b in trained.blocks]
    layout = dataclasses.replace(layout, micro_batch=2)
    padded = pm.estimate(cfg, layout, pm.RunShape(seq_length=long, global_batch_size=48))
    assert pm.estimate(cfg, layout, mixed).step.compute == pytest.approx(padded.step.compute)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: (pm.Layout(8, micro_batch=0), pm.RunShape()), "train.micro_batch_size must be >= 1, got 0"),
        (
            lambda: (pm.Layout(8), pm.RunShape(global_batch_size=-8)),
            "train.global_batch_size must be >= 1, got -8",
        ),
        (lambda: (pm.Layout(0), pm.RunShape()), "world size must be >= 1, got 0"),
        (
            lambda: (pm.Layout(8), pm.RunShape(mixed_lengths=((4096, -1.0),))),
            r"data.mixed_length_blends\[0\].weight must be a finite number >= 0, got -1.0",
        ),
        (
            lambda: (pm.Layout(8), pm.RunShape(mixed_lengths=((4096, 0.0),), blend_weight=0.0)),
            "weights sum to 0",
        ),
    ],
)
def test_hostile_library_inputs_are_plan_errors(make, message):
    """What the recipe schema rejects, given to the library directly: one PlanError naming the
    key (before: ZeroDivisionError, or negative tokens/s for a negative micro batch)."""
    with pytest.raises(pm.PlanError, match=message):
        pm.estimate(Nano3Config(), *make())


def test_what_the_model_does_not_calibrate_is_said():
    """fp32 precision and FP8 are not modelled: the plan says the numbers are bf16's."""
    from nemotron.config import PretrainConfig, load_config, resolve_config_path

    path = resolve_config_path("default", PretrainConfig)
    cfg = load_config(path, ["train.precision=fp32"], PretrainConfig)
    shape = pm.shape_from_config(cfg)
    assert shape.precision == "fp32"
    warnings = pm.estimate(Nano3Config(), pm.Layout(8, ep=8), shape).warnings
    assert any(w.startswith("train.precision=fp32 is not modelled") for w in warnings)
    cfg = load_config(path, ["train.fp8.enabled=true"], PretrainConfig)
    warnings = pm.estimate(Nano3Config(), pm.Layout(8, ep=8), pm.shape_from_config(cfg)).warnings
    assert any(w.startswith("train.fp8 is not modelled") for w in warnings)


def test_fp8_recipes_training_refuses_under_tp_are_never_recommended():
    """train.fp8.recipe=rowwise does not compose with TP (the config check refuses it): with it,
    a TP layout is marked refused with that reason and never recommended."""
    from nemotron.config import PretrainConfig, load_config, resolve_config_path

    overrides = ["train.fp8.enabled=true", "train.fp8.recipe=rowwise", "model.tensor_model_parallel_size=1"]
    overrides += ["model.sequence_parallel=false"]
    cfg = load_config(resolve_config_path("default", PretrainConfig), overrides, PretrainConfig)
    shape = pm.shape_from_config(cfg)
    tp = pm.estimate(Nano3Config(), pm.Layout(64, tp=2, ep=8), shape)
    assert not tp.implemented
    assert any(w.startswith("train.fp8.recipe: 'rowwise' does not compose with tensor") for w in tp.warnings)
    assert pm.estimate(Nano3Config(), pm.Layout(64, ep=8), shape).implemented
    # on 4096 GPUs only TP > 1 splits the 3072-sequence batch: nothing runs (bf16 would: TP4)
    assert pm.recommend(Nano3Config(), 4096, shape) == []
    reason = pm.no_layout_reason(Nano3Config(), 4096, shape)
    assert (
        reason.startswith("the layouts that fit on 4096 GPUs are ones training refuses")
        and "rowwise" in reason
    )
    assert pm.recommend(Nano3Config(), 4096, pm.RunShape())[0].layout.tp > 1
    assert not any("not modelled" in w for w in pm.estimate(Nano3Config(), pm.Layout(8, ep=8)).warnings)


def test_under_pp_the_weights_stay_gathered_whatever_fsdp_accumulate_unsharded_says():
    """torch.distributed.pipelining runs every stage backward without gradient sync or
    resharding and reduces once at the end (and training builds the stages with
    reshard_after_forward=False): train.fsdp_accumulate_unsharded=false changes nothing under
    PP, so the plan predicts the same memory and time, says so, and never offers it."""
    cfg, shape = Nano3Config(), pm.RunShape(global_batch_size=256)
    kept = pm.estimate(cfg, pm.Layout(128, ep=8, pp=2), shape)
    reshard = pm.estimate(cfg, pm.Layout(128, ep=8, pp=2, accumulate_unsharded=False), shape)
    assert reshard.memory == kept.memory and reshard.step == kept.step
    assert kept.memory.fsdp_buffers * pm.GIB == 6 * max(
        sum(u.unsharded for u in pm.stage_units(cfg, kept.layout, r, shape)) for r in range(2)
    )
    assert any("fsdp_accumulate_unsharded=false has no effect under PP" in w for w in reshard.warnings)
    assert all(
        p.layout.accumulate_unsharded
        for p in pm.recommend(cfg, 128, shape, include_pp=True)
        if p.layout.pp > 1
    )


def test_nano3_parameter_counts_per_tensor_from_the_architecture_facts():
    """Every count written out per tensor from the architecture (docs/reference.md §1: h 2688,
    Mamba in_proj 2688 -> 10304, conv over 6144 channels, 64 heads; GQA q 4096 / kv 256; 128
    experts 2688 -> 1856 -> 2688 + shared 3712; vocab 131072 untied), exact integers, against
    the model built on the meta device, `parameter_counts` and the plan's units."""
    import torch

    from nemotron.models.nano3 import Nano3ForCausalLM, parameter_counts

    h, vocab = 2688, 131072
    mamba = h + h * 10304 + 6144 * 4 + 6144 + 3 * 64 + 4096 + 4096 * h  # norm in_proj conv A D dt norm out
    attention = h + h * 4096 + 2 * h * 256 + 4096 * h  # norm q k v o
    routed = 128 * 2 * h * 1856
    moe = h + 128 * h + routed + 2 * h * 3712  # norm router experts shared
    assert (mamba, attention, moe) == (38_744_896, 23_399_040, 1_297_468_032)
    moe_active = moe - routed + 6 * 2 * h * 1856
    assert moe_active == 80_169_600
    total = 23 * mamba + 23 * moe + 6 * attention + 2 * vocab * h + h
    active = 23 * mamba + 23 * moe_active + 6 * attention + vocab * h + h  # without the input embedding
    assert (total, active) == (31_577_937_344, 3_227_751_872)

    cfg = Nano3Config()
    with torch.device("meta"):
        model = Nano3ForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == total
    expected = {"mamba": mamba, "attention": attention, "moe": moe}
    for i, kind in enumerate(cfg.block_kinds):
        assert sum(p.numel() for p in model.backbone.layers[str(i)].parameters()) == expected[kind], i
    counts = parameter_counts(cfg)
    assert (counts["total"], counts["active"], counts["active_with_embeddings"]) == (
        total,
        active,
        active + vocab * h,
    )
    by_block: dict = {}
    for u in pm.fsdp_units(cfg, pm.Layout(1)):
        by_block[u.block] = by_block.get(u.block, 0) + u.unsharded
    assert all(by_block[i] == expected[k] for i, k in enumerate(cfg.block_kinds))
    assert by_block[None] == 2 * vocab * h + h  # embeddings, final norm, LM head
    # TP8 EP8 on 8 GPUs, rank 0, written out: q/o and the shared expert split 8 ways, k/v whole
    # (2 KV heads < TP 8), the rank-local parts (norms, Mamba in_proj/conv/A/D/dt, router)
    # sharded 8 ways on dim 0, 16 of the 128 experts, the vocab split 8 ways
    mamba_rank = h * 512 + (336 + 1288 * h + 768 * 4 + 768 + 3 * 8 + 512)
    attention_rank = 512 * h + 2 * 256 * h + h * 512 + 336
    moe_rank = 2 * 464 * h + (336 + 16 * h) + 16 * 2 * h * 1856
    rank = 2 * (vocab // 8) * h + 336 + 23 * mamba_rank + 6 * attention_rank + 23 * moe_rank
    assert rank == 3_954_467_512
    assert sum(u.sharded for u in pm.fsdp_units(cfg, pm.Layout(8, tp=8, ep=8))) == rank


@pytest.mark.parametrize("schedule", ["1F1B", "GPipe", "Interleaved1F1B", "ZBVZeroBubble"])
def test_mixed_lengths_pay_a_pipeline_fill_and_drain_per_length(schedule):
    """One sample per micro-batch, two lengths: training runs a schedule step per length
    (`Pipeline._groups`), each with its own bubble, so the step's bubble is the sum of the two
    pure runs' (same stages: a manual split; each pure run of the same micro-batch count), and
    the most activations held are the long run's (GPipe: its 4 micro-batches, not all 8)."""
    cfg = Nano3Config()
    split = (13,) * 4 if schedule in ("1F1B", "GPipe") else (7,) * 4 + (6,) * 4
    layout = pm.Layout(32, ep=8, pp=4, pipeline_schedule=schedule, blocks_per_stage=split)
    mix = pm.RunShape(seq_length=8192, global_batch_size=64, mixed_lengths=((4096, 1.0),))
    mixed = pm.estimate(cfg, layout, mix)
    pure = [pm.estimate(cfg, layout, pm.RunShape(seq_length=n, global_batch_size=32)) for n in (8192, 4096)]
    assert mixed.grad_accumulation == 8 and pure[0].grad_accumulation == 4
    both = pure[0].step.pipeline_bubble + pure[1].step.pipeline_bubble
    assert mixed.step.pipeline_bubble == pytest.approx(both)
    assert mixed.memory.activations == pytest.approx(pure[0].memory.activations)
