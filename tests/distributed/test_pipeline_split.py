"""The pipeline stage split: balanced by the FLOP formula (checked against brute force over
every contiguous split), manual splits, stage placement, and the errors naming the keys."""

import itertools

import pytest

from nemotron.distributed.config import ParallelismConfig
from nemotron.distributed.pipeline_split import PipelineSplitError, block_costs, split_stages, stage_ranks
from nemotron.distributed.pipeline_split import stages_per_rank as stages_per_rank_of
from nemotron.models.nano3.config import Nano3Config
from nemotron.train import flops


def _brute_force_largest(costs, stages, head):
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = (0, *cuts, len(costs))
        pieces = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
        pieces[-1] += head
        best = min(best, max(pieces))
    return best


@pytest.mark.parametrize("pattern", ["MEMEM*EMEMEM*EMEME", "M*E-ME*EEM*"])
@pytest.mark.parametrize("lengths", [[(8192, 1.0)], [(524288, 0.5), (4096, 0.5)]])
@pytest.mark.parametrize("pp,schedule", [(2, "1F1B"), (4, "1F1B"), (2, "Interleaved1F1B")])
def test_split_minimises_the_most_expensive_stage(pattern, lengths, pp, schedule):
    cfg = Nano3Config(hybrid_pattern=pattern, num_layers=len(pattern))
    split = split_stages(
        cfg, ParallelismConfig(pipeline_model_parallel_size=pp, pipeline_schedule=schedule), lengths
    )
    costs = block_costs(cfg, lengths)
    head = flops.lm_head_forward_flops(cfg)
    assert [b.start for b in split.blocks][0] == 0 and split.blocks[-1].stop == len(pattern)
    assert all(a.stop == b.start and len(a) > 0 for a, b in zip(split.blocks, split.blocks[1:]))
    assert max(split.costs) == pytest.approx(_brute_force_largest(costs, split.num_stages, head))
    # the stage costs add up to the model's forward FLOPs per token (one formula)
    if len(lengths) == 1:
        assert sum(split.costs) == pytest.approx(flops.forward_flops_per_token(cfg, lengths[0][0]))


def test_nano3_split_and_description():
    cfg = Nano3Config()
    split = split_stages(cfg, ParallelismConfig(pipeline_model_parallel_size=4), [(8192, 1.0)])
    assert [len(b) for b in split.blocks] == [14, 14, 15, 9]  # the LM head weighs on stage 3
    lines = split.describe(cfg)
    assert lines[0].startswith("stage 0 (PP rank 0): blocks 0-13 'MEMEM*EMEMEM*E' + embeddings:")
    assert lines[3].startswith("stage 3 (PP rank 3): blocks 43-51 'EMEMEMEME' + LM head + loss:")
    assert sum(split.shares()) == pytest.approx(1.0)


def test_manual_split_and_placement():
    cfg = Nano3Config(hybrid_pattern="ME*EM-", num_layers=6)
    parallel = ParallelismConfig(
        pipeline_model_parallel_size=2,
        pipeline_schedule="ZBVZeroBubble",
        pipeline_blocks_per_stage=[1, 2, 2, 1],
    )
    split = split_stages(cfg, parallel, [(64, 1.0)])
    assert [(b.start, b.stop) for b in split.blocks] == [(0, 1), (1, 3), (3, 5), (5, 6)]
    assert split.manual and split.ranks == (0, 1, 1, 0)  # a V: rank 0 holds the first and last
    assert stage_ranks(6, 3, "Interleaved1F1B") == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(pipeline_schedule="Foo"), r"model.pipeline_schedule='Foo' is not one of"),
        (
            dict(pipeline_blocks_per_stage=[3, 2]),
            r"pipeline_blocks_per_stage=\[3, 2\] must list 2 "
            r"stages .* summing to model.num_layers=6",
        ),
        (dict(pipeline_blocks_per_stage=[6, 0]), r"at least one block each"),
        (dict(virtual_pipeline_model_parallel_size=2), r"1F1B runs one stage per rank"),
        (
            dict(pipeline_schedule="ZBVZeroBubble", virtual_pipeline_model_parallel_size=3),
            r"exactly 2 stages per rank",
        ),
        (
            dict(pipeline_model_parallel_size=4, pipeline_schedule="Interleaved1F1B"),
            r"8 pipeline stages \(model\.pipeline_model_parallel_size=4 x 2 per rank\) need at "
            r"least one block each, but model\.num_layers=6",
        ),
    ],
)
def test_impossible_layouts_name_the_key(kw, message):
    cfg = Nano3Config(hybrid_pattern="ME*EM-", num_layers=6)
    parallel = ParallelismConfig(**{"pipeline_model_parallel_size": 2, **kw})
    with pytest.raises(PipelineSplitError, match=message):
        split_stages(cfg, parallel, [(64, 1.0)])


def test_tied_embeddings_across_stages_are_one_config_error():
    """Tied embeddings under PP passed validation and the run's start, then every rank died
    building its part (a ValueError from the model, a traceback per rank). Now the recipe's
    validation names both keys; one stage (PP 1) keeps them tied."""
    import dataclasses

    from models.tiny import tiny_config

    from nemotron.config.schema import ConfigError, validate_pretrain
    from nemotron.distributed.parallel_dims import ParallelDims, ParallelLayoutError

    from .pipeline_harness import make_config

    tied = dict(tie_word_embeddings=True)
    message = r"model\.tie_word_embeddings=true cannot be split over 2 pipeline stages"
    with pytest.raises(ConfigError, match=message):
        validate_pretrain(make_config(dict(pipeline_model_parallel_size=2), tied))
    with pytest.raises(ConfigError, match="over 4 pipeline stages"):
        validate_pretrain(
            make_config(dict(pipeline_model_parallel_size=2, pipeline_schedule="ZBVZeroBubble"), tied)
        )
    arch = tiny_config(**tied)
    with pytest.raises(ParallelLayoutError, match=message):
        ParallelDims.from_config(ParallelismConfig(pipeline_model_parallel_size=2), 2, arch)
    one = split_stages(arch, ParallelismConfig(), [(64, 1.0)])
    assert one.blocks == (range(0, 6),)
    validate_pretrain(make_config({}, tied))
    assert (
        split_stages(
            dataclasses.replace(arch, tie_word_embeddings=False),
            ParallelismConfig(pipeline_model_parallel_size=2),
            [(64, 1.0)],
        ).num_stages
        == 2
    )


def test_recipe_with_a_manual_split_validates():
    """The recipe's `model` section (architecture and parallel keys, the manual split a list)
    is what validation hands the split: it raised `TypeError: unhashable type: 'list'` for
    every `model.pipeline_blocks_per_stage`, valid or not."""
    from nemotron.config.schema import validate_pretrain

    from .pipeline_harness import make_config

    cfg = make_config(dict(pipeline_model_parallel_size=2, pipeline_blocks_per_stage=[1, 5]))
    validate_pretrain(cfg)
    split = split_stages(cfg.model, cfg.model.parallel(), [(64, 1.0)])
    assert [(b.start, b.stop) for b in split.blocks] == [(0, 1), (1, 6)] and split.manual
    # the same split as the plain architecture's (one memo entry per architecture and layout)
    assert split == split_stages(cfg.model.arch(), cfg.model.parallel(), [(64, 1.0)])


@pytest.mark.parametrize(
    "kw,shown",
    [
        (dict(pipeline_blocks_per_stage=[True, 5]), "[True, 5]"),
        (dict(pipeline_blocks_per_stage=[3.0, 3]), "[3.0, 3]"),
        (dict(pipeline_blocks_per_stage="3,3"), "'3,3'"),
        (dict(pipeline_blocks_per_stage=6), "got 6"),
        (dict(pipeline_blocks_per_stage=[[3], [3]]), "[[3], [3]]"),
    ],
)
def test_manual_split_of_another_type_is_one_config_error(kw, shown):
    from nemotron.config.schema import ConfigError, validate_pretrain

    from .pipeline_harness import make_config

    cfg = make_config(dict(pipeline_model_parallel_size=2, **kw))
    with pytest.raises(
        ConfigError, match="model.pipeline_blocks_per_stage must be a list of block counts"
    ) as err:
        validate_pretrain(cfg)
    assert shown in str(err.value)


def test_virtual_stages_of_true_are_refused():
    # a YAML `true` is an int to Python: it was taken as one stage per rank
    with pytest.raises(PipelineSplitError, match="virtual_pipeline_model_parallel_size must be an integer"):
        stages_per_rank_of(
            ParallelismConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=True)
        )
