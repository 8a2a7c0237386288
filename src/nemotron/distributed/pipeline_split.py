"""Which blocks each pipeline stage holds, balanced by cost rather than block count.

Nano3's blocks cost different amounts (per token, forward, full width: an MoE block ~160
MFLOP, a Mamba-2 block ~81 MFLOP, an attention block ~47 MFLOP plus 2*q*S for the causal
scores, which at 512K tokens is 4.3 GFLOP), and the last stage also runs the LM head (~700
MFLOP per token). The split takes each block's cost from the one FLOP formula
(`train/flops.py`), at the run's sequence lengths, adds the LM head (and the final norm) to the
last stage and the embeddings (a lookup: no FLOPs) to the first, and picks the contiguous
split into `stages` pieces of at least one block whose most expensive stage is cheapest.
`model.pipeline_blocks_per_stage` gives the split by hand instead.

Stages are assigned to ranks as torch.distributed.pipelining's schedules expect: one stage per
rank for 1F1B and GPipe; with V stages per rank, "loop" order (rank r holds stages r, r+PP,
...) for the interleaved schedules and the "V" order (rank r holds r and 2*PP-1-r) for
ZBVZeroBubble.

Torch-free, so that a dry run can print the split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nemotron.distributed.config import ParallelismConfig
from nemotron.models.nano3.config import Nano3Config
from nemotron.train import flops

# schedule name (torch.distributed.pipelining) -> (default stages per rank, rank placement)
SCHEDULES: dict[str, tuple[int, str]] = {
    "1F1B": (1, "loop"),
    "GPipe": (1, "loop"),
    "Interleaved1F1B": (2, "loop"),
    "InterleavedZeroBubble": (2, "loop"),
    "ZBVZeroBubble": (2, "v"),
}
SINGLE_STAGE_SCHEDULES = ("1F1B", "GPipe")


class PipelineSplitError(ValueError):
    """A pipeline layout (schedule, stages per rank, manual split) that cannot be built."""


def stages_per_rank(parallel: ParallelismConfig) -> int:
    """Model parts each pipeline rank holds (`virtual_pipeline_model_parallel_size`)."""
    schedule = parallel.pipeline_schedule
    if schedule not in SCHEDULES:
        raise PipelineSplitError(f"model.pipeline_schedule={schedule!r} is not one of {list(SCHEDULES)}")
    default, placement = SCHEDULES[schedule]
    virtual = parallel.virtual_pipeline_model_parallel_size
    if virtual is None:
        return default
    if isinstance(virtual, bool) or not isinstance(virtual, int) or virtual < 1:
        raise PipelineSplitError(
            f"model.virtual_pipeline_model_parallel_size must be an integer >= 1, got {virtual!r}"
        )
    if schedule in SINGLE_STAGE_SCHEDULES and virtual != 1:
        raise PipelineSplitError(
            f"model.pipeline_schedule={schedule} runs one stage per rank; "
            f"model.virtual_pipeline_model_parallel_size={virtual} needs Interleaved1F1B, "
            "InterleavedZeroBubble or ZBVZeroBubble"
        )
    if schedule not in SINGLE_STAGE_SCHEDULES and virtual < 2:
        raise PipelineSplitError(
            f"model.pipeline_schedule={schedule} needs at least 2 stages per rank; "
            f"model.virtual_pipeline_model_parallel_size={virtual}"
        )
    if placement == "v" and virtual != 2:
        raise PipelineSplitError(
            f"model.pipeline_schedule={schedule} places exactly 2 stages per rank (a V); "
            f"model.virtual_pipeline_model_parallel_size={virtual}"
        )
    return virtual


def stage_ranks(num_stages: int, pp: int, schedule: str) -> list[int]:
    """The pipeline rank that holds each stage."""
    if SCHEDULES[schedule][1] == "v":
        return [s if s < pp else 2 * pp - 1 - s for s in range(num_stages)]
    return [s % pp for s in range(num_stages)]


def block_costs(config: Nano3Config, lengths: list[tuple[int, float]]) -> list[float]:
    """Forward FLOPs per token of every block, averaged over the tokens of samples of the given
    (sequence length, share of samples) pairs (attention's cost grows with the length)."""
    token_weights = [(length, share * length) for length, share in lengths]
    total = sum(w for _, w in token_weights)
    return [
        sum(w * flops.block_forward_flops(config, kind, length) for length, w in token_weights) / total
        for kind in config.block_kinds
    ]


@dataclass(frozen=True)
class StageSplit:
    """Blocks of every pipeline stage (in stage order), each stage's estimated forward FLOPs
    per token and the ranks holding them."""

    blocks: tuple[range, ...]
    costs: tuple[float, ...]
    ranks: tuple[int, ...]
    manual: bool = False

    @property
    def num_stages(self) -> int:
        return len(self.blocks)

    def shares(self) -> list[float]:
        total = sum(self.costs)
        return [c / total for c in self.costs]

    def describe(self, config: Nano3Config) -> list[str]:
        """One line per stage: rank, blocks, their pattern, the ends it holds, its cost share."""
        pattern = config.hybrid_pattern
        lines = []
        last = self.num_stages - 1
        for stage, (blocks, share, rank) in enumerate(zip(self.blocks, self.shares(), self.ranks)):
            ends = (["embeddings"] if stage == 0 else []) + (["LM head + loss"] if stage == last else [])
            lines.append(
                f"stage {stage} (PP rank {rank}): blocks {blocks.start}-{blocks.stop - 1} "
                f"'{pattern[blocks.start : blocks.stop]}'"
                + (f" + {' + '.join(ends)}" if ends else "")
                + f": {share:.1%} of the FLOPs"
            )
        return lines


def _balanced_partition(costs: list[float], stages: int, first_extra: float, last_extra: float) -> list[int]:
    """Sizes of the contiguous split of `costs` into `stages` non-empty pieces (the first
    carrying `first_extra`, the last `last_extra`): the most expensive piece as cheap as
    possible, then, among such splits, the pieces as even as possible (least sum of squares)."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def piece(i: int, j: int, stage: int) -> float:
        extra = (first_extra if stage == 0 else 0.0) + (last_extra if stage == stages - 1 else 0.0)
        return prefix[j] - prefix[i] + extra

    def solve(combine, limit: float) -> tuple[float, list[int]]:
        # best[s][j]: the best value of splitting blocks [0, j) into s pieces (each <= limit)
        inf = float("inf")
        best = [[inf] * (n + 1) for _ in range(stages + 1)]
        cut = [[0] * (n + 1) for _ in range(stages + 1)]
        best[0][0] = 0.0
        for s in range(1, stages + 1):
            for j in range(s, n - (stages - s) + 1):
                for i in range(s - 1, j):
                    cost = piece(i, j, s - 1)
                    if best[s - 1][i] == inf or cost > limit:
                        continue
                    value = combine(best[s - 1][i], cost)
                    if value < best[s][j]:
                        best[s][j], cut[s][j] = value, i
        sizes, j = [], n
        for s in range(stages, 0, -1):
            sizes.append(j - cut[s][j])
            j = cut[s][j]
        return best[stages][n], sizes[::-1]

    largest, _ = solve(max, float("inf"))
    _, sizes = solve(lambda total, cost: total + cost * cost, largest * (1 + 1e-9))
    return sizes


def split_stages(
    config: Nano3Config, parallel: ParallelismConfig, lengths: list[tuple[int, float]]
) -> StageSplit:
    """The stage split of a run: `lengths` are its (sequence length, share of samples) pairs
    (`[(train.seq_length, 1.0)]` unless lengths are mixed). Memoised: a pure function of its
    arguments, which the layout validation and the performance model (thousands of candidate
    layouts per `nemotron nano3 plan`) ask again and again."""
    manual = parallel.pipeline_blocks_per_stage
    if manual is not None and (
        not isinstance(manual, (list, tuple))
        or any(isinstance(s, bool) or not isinstance(s, int) for s in manual)
    ):
        raise PipelineSplitError(
            f"model.pipeline_blocks_per_stage must be a list of block counts (integers), got {manual!r}"
        )
    key = (
        # the architecture's fields only: `config` may be the recipe's `model` section, whose
        # parallel fields (a list among them) are not hashable and are keyed below
        tuple(getattr(config, f.name) for f in dataclasses.fields(Nano3Config)),
        parallel.pipeline_model_parallel_size,
        parallel.pipeline_schedule,
        parallel.virtual_pipeline_model_parallel_size,
        None if manual is None else tuple(manual),
        tuple(lengths),
    )
    if key not in _SPLITS:
        if len(_SPLITS) > 4096:
            _SPLITS.clear()
        _SPLITS[key] = _split_stages(config, parallel, lengths)
    return _SPLITS[key]


_SPLITS: dict[tuple, StageSplit] = {}


def _split_stages(
    config: Nano3Config, parallel: ParallelismConfig, lengths: list[tuple[int, float]]
) -> StageSplit:
    pp = parallel.pipeline_model_parallel_size
    virtual = stages_per_rank(parallel)
    stages = pp * virtual
    costs = block_costs(config, lengths)
    head = flops.lm_head_forward_flops(config)
    n = config.num_layers
    manual = parallel.pipeline_blocks_per_stage
    if stages > 1 and config.tie_word_embeddings:
        # the embedding is the first stage's and the LM head the last's: one weight cannot be
        # both (the model refuses such a part, `model.check_blocks`; said here, before a run)
        raise PipelineSplitError(
            f"model.tie_word_embeddings=true cannot be split over {stages} pipeline stages "
            f"(model.pipeline_model_parallel_size={pp} x {virtual} per rank): the embeddings "
            "live on the first stage and the LM head on the last; set "
            "model.tie_word_embeddings=false or model.pipeline_model_parallel_size=1"
        )
    if manual is not None:
        sizes = list(manual)
        if len(sizes) != stages or any(not isinstance(s, int) or s < 1 for s in sizes) or sum(sizes) != n:
            raise PipelineSplitError(
                f"model.pipeline_blocks_per_stage={sizes} must list {stages} stages (PP "
                f"{pp} x {virtual} per rank) of at least one block each, summing to "
                f"model.num_layers={n} (sums to {sum(s for s in sizes if isinstance(s, int))})"
            )
    else:
        if stages > n:
            raise PipelineSplitError(
                f"{stages} pipeline stages (model.pipeline_model_parallel_size={pp} x {virtual} "
                f"per rank) need at least one block each, but model.num_layers={n}"
            )
        sizes = _balanced_partition(costs, stages, 0.0, head)
    blocks, start = [], 0
    for size in sizes:
        blocks.append(range(start, start + size))
        start += size
    stage_costs = [sum(costs[b.start : b.stop]) for b in blocks]
    stage_costs[-1] += head
    return StageSplit(
        tuple(blocks),
        tuple(stage_costs),
        tuple(stage_ranks(stages, pp, parallel.pipeline_schedule)),
        manual=manual is not None,
    )


def run_lengths(seq_length: int, data) -> list[tuple[int, float]]:
    """(sequence length, share of samples) of a run's training samples: `train.seq_length`,
    and `data.mixed_length_blends` by weight."""
    if data is None or not data.mixed_length_blends:
        return [(seq_length, 1.0)]
    return length_shares(
        seq_length, data.blend_weight, [(m.seq_length, m.weight) for m in data.mixed_length_blends]
    )


def length_shares(
    seq_length: int, blend_weight: float, mixed: list[tuple[int, float]]
) -> list[tuple[int, float]]:
    """`run_lengths` from the numbers: the main blend's weight and each mixed blend's (length,
    weight) (the performance model carries these, not the data config)."""
    if not mixed:
        return [(seq_length, 1.0)]
    pairs = [(seq_length, blend_weight), *mixed]
    total = sum(w for _, w in pairs)
    return [(length, w / total) for length, w in pairs if w > 0]
