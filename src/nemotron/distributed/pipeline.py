"""Pipeline parallelism on torch.distributed.pipelining: stages, schedules, one training step.

Each pipeline rank builds its model parts (`Nano3ForCausalLM(config, blocks=...)`, the split
of `pipeline_split.split_stages`), each part is parallelised on its stage's DP/CP/TP/EP mesh like
a whole model (`distributed.apply.parallelize`: under TP the first part's embeddings and the last
part's LM head and loss are vocab-parallel, as in a whole model), and wrapped in a
`PipelineStage`; a schedule of
torch.distributed.pipelining (1F1B, GPipe, Interleaved1F1B, InterleavedZeroBubble,
ZBVZeroBubble) runs the micro-batches of a step through them.

What crosses stages, and how it stays exact:
- activations: the hidden states and the running sum of the MoE balance losses (a scalar);
  the last stage therefore holds the whole model's balance loss of every micro-batch, and its
  gradient reaches every MoE layer through the pipeline's own backward. Under TP + sequence
  parallel the hidden states are this TP rank's sequence shard [b, s/TP, h], sent to the same
  TP rank of the next stage (the pipeline group links ranks of equal DP/CP/TP coordinates);
  the balance-loss sum is identical on a stage's TP ranks (each gathers whole sequences).
- the loss: the last stage scores micro-batch i as `w_i * lm_loss_i + c/n * aux_i` with the
  token weights of `utils.token_loss_weights` (the step's token-mean LM loss over every
  micro-batch and DP x CP rank) and c the balance-loss coefficient (a mean over the n
  micro-batches): the same objective as one process. `scale_grads=False`: nothing rescales it.
- logged values, gradient norm: summed over the loss group of the last stage, then over the
  pipeline ranks (every rank logs the same numbers; the norm is the whole model's: each
  stage's norm over its DTensor gradients, complete over the stage's DP/TP/EP shards, then
  squares summed over the pipeline ranks).
- expert-bias counts: each stage's MoE layers count their own tokens; the bias update sums
  them over the stage's ranks only (`ParallelMesh.balancing_group`); the logged load figures
  are every stage's, gathered over the pipeline ranks (`Pipeline.whole_model_balance`).

Data: every stage reads the same micro-batches (their shapes set what the stages exchange);
only the first stage moves token ids to the device, only the last stage labels and the loss
mask. Micro-batches of different lengths (the long-context mix) are run as one schedule step
per length, in the order of their first micro-batch, cut where another DP rank's lengths change
(every rank runs the same counts: `Pipeline._common_starts`), and a count an interleaved
schedule refuses as two (`Pipeline._accepted_counts`); gradients accumulate across them.

`LocalStages` gathers this rank's parts under the whole model's parameter names: the
optimizer, checkpoints (DCP reshards across pipeline sizes, since names and global shapes do
not depend on the split), train/eval mode and the expert-bias update use it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from nemotron.distributed.apply import check_local_sequence, parallelize
from nemotron.distributed.mesh import ParallelMesh
from nemotron.distributed.parallel_dims import context_halo
from nemotron.distributed.pipeline_schedules import schedule_runs
from nemotron.distributed.pipeline_split import StageSplit, split_stages
from nemotron.distributed.utils import grad_norm, padding_mask
from nemotron.models.nano3.model import Nano3ForCausalLM

if TYPE_CHECKING:
    from nemotron.train.balancing import BalanceStats


class LocalStages(nn.Module):
    """This rank's pipeline parts, registered under the whole model's names (`backbone.layers.7`,
    `lm_head`, ...): the same module objects the parts run, so parameters, buffers and
    state dicts are those of the whole model restricted to what this rank holds."""

    def __init__(self, config, parts: Sequence[Nano3ForCausalLM]) -> None:
        super().__init__()
        self.config = config
        self.backbone = nn.Module()
        self.backbone.layers = nn.ModuleDict()
        for part in parts:
            if part.backbone.embeddings is not None:
                self.backbone.embeddings = part.backbone.embeddings
            # ModuleDict.update takes a ModuleDict too; its annotation says only Mapping
            self.backbone.layers.update(part.backbone.layers)  # type: ignore[arg-type]
            if part.backbone.norm_f is not None:
                self.backbone.norm_f = part.backbone.norm_f
            if part.lm_head is not None:
                self.lm_head = part.lm_head

    is_pipeline_part = True  # checkpoints hold other stages' parameters too

    def moe_layers(self) -> list[nn.Module]:
        from nemotron.models.nano3.moe import MoE

        layers = self.backbone.layers
        assert isinstance(layers, nn.ModuleDict)  # set in __init__
        return [block.mixer for block in layers.values() if isinstance(block.mixer, MoE)]

    def forward(self, *args, **kwargs):
        raise RuntimeError("pipeline parts run through their schedule (Pipeline.train_step)")


@dataclass
class PipelineStepResult:
    lm_sum: float  # sum over the step's micro-batches (this rank's stage group) of lm_loss * tokens
    balance_sum: float  # sum over micro-batches of coefficient * balance loss


class _StepLoss:
    """The schedule's loss function: scores micro-batch i (the schedule's `target` carries
    its index in the step) and records its LM and balance losses."""

    def __init__(self) -> None:
        self.weights: list[float] = []
        self.aux_weight = 0.0
        self.lm: dict[int, torch.Tensor] = {}
        self.aux: dict[int, torch.Tensor] = {}

    def __call__(self, output: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        lm_loss, aux_loss = output
        index = int(target.reshape(-1)[0])
        self.lm[index], self.aux[index] = lm_loss.detach(), aux_loss.detach()
        return lm_loss * self.weights[index] + aux_loss * self.aux_weight


class _Stage(PipelineStage):
    """A `PipelineStage` whose same-rank hand-over of input gradients is empty without a
    backward. torch's multi-stage runtime runs a schedule's backward actions in `eval()` too
    (each a no-op on the stage), but after the backward of a stage whose predecessor is on the
    same rank (ZBVZeroBubble's V: stages PP-1 and PP on rank PP-1) it hands the input gradient
    over locally, and the stock stage raises there without a backward ("can't steal_bwd_input"):
    every evaluation through ZBV failed. With a backward these are the stock methods."""

    def get_local_bwd_output(self, mb_index):
        if not self.has_backward:
            return ()  # no input gradient: nothing to hand over
        return super().get_local_bwd_output(mb_index)

    def set_local_bwd_input(self, next_stage_bwd_outputs, mb_index: int) -> None:
        if not self.has_backward:
            return
        super().set_local_bwd_input(next_stage_bwd_outputs, mb_index)


class Pipeline:
    """This rank's stages and the schedules that run them (one per micro-batch shape, made on
    first use: a `PipelineStage` fixes the shapes it exchanges)."""

    def __init__(
        self,
        parts: list[Nano3ForCausalLM],
        stage_ids: list[int],
        split: StageSplit,
        schedule: str,
        mesh: ParallelMesh,
        device: torch.device,
        activation_dtype: torch.dtype,
        hidden_size: int,
    ) -> None:
        self.parts, self.stage_ids, self.split = parts, stage_ids, split
        self.schedule_name = schedule
        self.mesh, self.device = mesh, device
        self.activation_dtype, self.hidden_size = activation_dtype, hidden_size
        self.num_stages = split.num_stages
        self.tp = mesh.dims.tp  # the stages exchange sequence-parallel shards (`_stage_args`)
        # every context-parallel chunk holds the Mamba conv's context (of any stage's blocks)
        self.context_halo = context_halo(parts[0].config)
        self.group = mesh.pp_mesh.get_group()
        self.has_first = 0 in stage_ids
        self.has_last = self.num_stages - 1 in stage_ids
        self.local = LocalStages(parts[0].config, parts)
        self.loss = _StepLoss()
        self._schedules: dict[tuple, object] = {}

    # -- building -----------------------------------------------------------------------------

    def _stage_args(self, stage_id: int, batch: int, seq: int):
        """Example (meta) inputs and outputs of a stage for micro-batches of [batch, seq] token
        ids (this rank's context-parallel chunks). Under tensor parallel the hidden states a
        stage exchanges are this rank's sequence-parallel shard [batch, seq/TP, hidden]: each
        TP rank sends its own shard to the same TP rank of the next stage (1/TP of the traffic
        of sending whole sequences, and no gather or scatter at the stage boundary)."""
        meta = torch.device("meta")
        # on every pipeline rank, before any exchange: the model's own check runs on the first
        # stage only, and the later stages would then wait for it forever
        check_local_sequence(seq, self.tp, self.mesh.dims.cp, self.context_halo)
        # requires_grad marks what carries a gradient back (torch >= 2.13 reads it)
        hidden = torch.empty(
            batch,
            seq // self.tp,
            self.hidden_size,
            dtype=self.activation_dtype,
            device=meta,
            requires_grad=True,
        )
        scalar = torch.empty((), dtype=torch.float32, device=meta, requires_grad=True)
        inputs = (
            (torch.empty(batch, seq, dtype=torch.long, device=meta),) if stage_id == 0 else (hidden, scalar)
        )
        outputs = (scalar, scalar) if stage_id == self.num_stages - 1 else (hidden, scalar)
        return inputs, outputs

    def _schedule(self, count: int, batch: int, seq: int, training: bool):
        key = (count, batch, seq, training)
        if key not in self._schedules:
            stages = []
            for part, stage_id in zip(self.parts, self.stage_ids):
                inputs, outputs = self._stage_args(stage_id, batch, seq)
                stages.append(
                    _Stage(
                        part,
                        stage_id,
                        self.num_stages,
                        self.device,
                        input_args=inputs,
                        output_args=outputs,
                        group=self.group,
                    )
                )
            cls = get_schedule_class(self._schedule_name(count))
            if issubclass(cls, PipelineScheduleSingle):
                self._schedules[key] = cls(
                    stages[0], n_microbatches=count, loss_fn=self.loss, scale_grads=False
                )
            else:
                self._schedules[key] = cls(stages, n_microbatches=count, loss_fn=self.loss, scale_grads=False)
        return self._schedules[key]

    def _schedule_name(self, count: int) -> str:
        """The torch schedule that runs a group of `count` micro-batches: the configured one,
        or GPipe for fewer micro-batches than 1F1B's stages (`schedule_runs`)."""
        ((name, _),) = schedule_runs(self.schedule_name, self.mesh.dims.pp, count)
        return name

    # -- running ------------------------------------------------------------------------------

    def _groups(self, micro_batches: list[dict[str, torch.Tensor]]) -> list[list[int]]:
        """The step's schedule runs: micro-batch indices grouped by shape, in order of first
        appearance, each group cut where any rank of the loss group (DP x CP) starts a group
        (`_common_starts`); a run of a count the schedule refuses is run as two that it
        accepts (`_accepted_counts`)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, b in enumerate(micro_batches):
            groups.setdefault(tuple(b["tokens"].shape), []).append(i)
        order = [i for group in groups.values() for i in group]
        starts = [False] * len(order)
        position = 0
        for group in groups.values():
            starts[position] = True
            position += len(group)
        starts = self._common_starts(starts)
        out = []
        bounds = [p for p, start in enumerate(starts) if start] + [len(order)]
        for first, stop in zip(bounds, bounds[1:]):
            for count in self._accepted_counts(stop - first):
                out.append(order[first : first + count])
                first += count
        return out

    def _common_starts(self, starts: list[bool]) -> list[bool]:
        """Where a schedule run starts, agreed over the loss group (DP x CP): a run starts
        where any of its ranks starts a group of another shape. The stages of different DP
        ranks meet in collectives once per run (FSDP's gradient reduce-scatter after a run's
        last backward) or per micro-batch in the schedule's order (EP's all-to-all): with
        mixed lengths the ranks' micro-batches differ in shape (the loader evens out the mix
        of a step's lengths over the ranks only to within 2 per blend), and runs grouped by
        each rank's own shapes differ in number and size, which left the ranks waiting on
        each other forever. Cut at every rank's group starts, every run holds one shape on
        every rank, and all ranks run the same counts in the same order."""
        if self.mesh.loss_group_size == 1:
            return starts
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if self.mesh.world.device_type == "cuda"
            else torch.device("cpu")
        )
        group = self.mesh.loss_group
        # one all-reduce (max) of [count, -count, starts...]: the same length on every rank
        # only if the counts agree, so those are compared first
        count = torch.tensor([len(starts), -len(starts)], dtype=torch.int64, device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
        if int(count[0]) != -int(count[1]):
            raise RuntimeError(
                f"the data-parallel ranks of a pipeline stage hold {-int(count[1])} to "
                f"{int(count[0])} micro-batches this step (this rank {len(starts)}): their "
                "schedules would not meet"
            )
        flags = torch.tensor(starts, dtype=torch.int64, device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        return [bool(f) for f in flags.cpu().tolist()]

    def _accepted_counts(self, count: int) -> list[int]:
        """`count` micro-batches as schedule runs the configured schedule accepts
        (`pipeline_schedules.schedule_runs`, the one home of the rule: torch's interleaved
        schedules refuse a count that is not a multiple of their rounds, such a count runs as
        a multiple of PP and the rest). How many micro-batches of one length a step holds
        depends on the data under mixed lengths; gradients accumulate across the runs, as
        across lengths."""
        return [n for _, n in schedule_runs(self.schedule_name, self.mesh.dims.pp, count)]

    def run(
        self,
        micro_batches: list[dict[str, torch.Tensor]],
        weights: list[float],
        aux_weight: float,
        training: bool,
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Forward (and backward when `training`) of every micro-batch through the pipeline.
        `weights[i]`: the LM-loss weight of micro-batch i; `aux_weight`: the balance loss's.
        Returns {i: (lm_loss_i, balance_loss_i)} on ranks holding the last stage, else {}."""
        self.loss.weights, self.loss.aux_weight = weights, aux_weight
        self.loss.lm, self.loss.aux = {}, {}
        for group in self._groups(micro_batches):
            batch, seq = micro_batches[group[0]]["tokens"].shape
            # A schedule's first step clears the stage parameters' gradients (torch 2.13's
            # post-initialisation clean-up), which would drop the gradients of the step's
            # earlier groups: keep them aside and add them back.
            fresh = (len(group), batch, seq, training) not in self._schedules
            kept = self._take_gradients() if fresh and training else {}
            schedule = self._schedule(len(group), batch, seq, training)
            args: tuple[torch.Tensor, ...] = ()
            kwargs: dict[str, torch.Tensor] = {}
            target: torch.Tensor | None = None
            if self.has_first:
                args = (torch.cat([micro_batches[i]["tokens"] for i in group]).to(self.device),)
            if self.has_last:
                kwargs = {
                    key: torch.cat([micro_batches[i][key] for i in group]).to(self.device)
                    for key in ("labels", "loss_mask")
                }
                target = torch.tensor(group)  # chunked with the micro-batches: each its index
            labels = torch.cat([micro_batches[i]["labels"] for i in group])
            padding = padding_mask(labels)
            if padding is not None:
                # Every stage's MoE blocks leave padding out of their balancing statistics; every
                # rank holds the batch, so all take this branch alike.
                kwargs["padding_mask"] = padding.to(self.device)
            run = schedule.step if training else schedule.eval
            run(*args, target=target, return_outputs=False, **kwargs)
            self._add_gradients(kept)
        return {i: (self.loss.lm[i], self.loss.aux[i]) for i in self.loss.lm}

    def _take_gradients(self) -> dict[nn.Parameter, torch.Tensor]:
        kept = {p: p.grad for p in self.local.parameters() if p.grad is not None}
        for p in kept:
            p.grad = None
        return kept

    @torch.no_grad()
    def _add_gradients(self, kept: dict[nn.Parameter, torch.Tensor]) -> None:
        for p, grad in kept.items():
            p.grad = grad if p.grad is None else p.grad.add_(grad)

    # -- reductions over the pipeline ---------------------------------------------------------

    def _sum_over_pipeline(self, values: torch.Tensor) -> torch.Tensor:
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if self.mesh.world.device_type == "cuda"
            else torch.device("cpu")
        )
        values = values.to(device)
        dist.all_reduce(values, group=self.group)
        return values.cpu()

    def from_last_stage(self, values: list[float]) -> list[float]:
        """`values` as the ranks holding the last stage have them, on every pipeline rank."""
        mine = torch.tensor(values if self.has_last else [0.0] * len(values), dtype=torch.float64)
        return self._sum_over_pipeline(mine).tolist()

    def whole_model_balance(self, stats: BalanceStats) -> BalanceStats:
        """The expert-load figures of every stage's MoE layers, in the whole model's layer
        order, on every pipeline rank: `stats` (a `train.balancing.BalanceStats`) is this
        rank's layers' only (each rank updates the biases of its own stages), and a log written
        by rank 0 alone would otherwise show the first stage's layers as the model's."""
        from nemotron.models.nano3.moe import MoE
        from nemotron.train.balancing import BalanceStats

        kinds = self.local.config.block_kinds
        position = {block: n for n, block in enumerate(i for i, kind in enumerate(kinds) if kind == "moe")}
        layers = self.local.backbone.layers
        assert isinstance(layers, nn.ModuleDict)  # set in LocalStages.__init__
        # the order of `LocalStages.moe_layers`, which `stats` follows
        mine = [position[int(name)] for name, block in layers.items() if isinstance(block.mixer, MoE)]
        rows = (stats.max_over_mean, stats.bias_min, stats.bias_max, stats.tokens)
        table = torch.zeros(len(rows), len(position), dtype=torch.float64)
        for row, values in enumerate(rows):
            table[row, mine] = torch.tensor(values, dtype=torch.float64)
        table = self._sum_over_pipeline(table)  # each layer is held by one rank: exact
        return BalanceStats(*(row.tolist() for row in table))

    def grad_norm(self, params: list[torch.nn.Parameter]) -> float:
        """The whole model's gradient norm (every stage's parameters)."""
        local = float(grad_norm(params))  # inf or nan anywhere makes the total so everywhere
        total = self._sum_over_pipeline(torch.tensor([local * local], dtype=torch.float64))
        return math.sqrt(float(total[0]))


def build_pipeline(
    config,
    parallel,
    mesh: ParallelMesh,
    device: torch.device,
    *,
    lengths: list[tuple[int, float]],
    make_part: Callable[[range], Nano3ForCausalLM],
    mixed_precision: bool,
    seed: int,
) -> Pipeline:
    """This rank's parts of the split of `config` for `parallel` (a `ParallelismConfig`),
    each made on the meta device by `make_part(blocks)`, parallelised on the stage mesh and
    initialised to the weights the whole single-device model gets under `seed`.
    `lengths`: the run's (sequence length, share of samples), for the cost-balanced split."""
    split = split_stages(config, parallel, lengths)
    stage_ids = [s for s, rank in enumerate(split.ranks) if rank == mesh.pp_rank]
    parts = []
    for stage_id in stage_ids:
        part = make_part(split.blocks[stage_id])
        # Weights stay gathered between the micro-batches of a step (torchtitan does the same
        # under PP): resharding would re-gather them for every micro-batch's forward.
        parallelize(part, mesh, parallel, mixed_precision=mixed_precision, reshard_after_forward=False)
        part.to_empty(device=device)
        torch.manual_seed(seed)
        part.reset_parameters()  # its share of the whole model's init under this seed
        parts.append(part)
    return Pipeline(
        parts,
        stage_ids,
        split,
        parallel.pipeline_schedule,
        mesh,
        device,
        torch.bfloat16 if mixed_precision else torch.float32,
        config.hidden_size,
    )
